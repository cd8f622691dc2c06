"""The arena: blind pairwise votes between contenders (a model and its settings) and their Bradley-Terry ratings
(docs/arena.md). `Arena` is what the REST routes and the arena page call."""

from image_gen.arena.service import Arena, ArenaLeaderboard, BattleView, Reveal, rate_votes
from image_gen.arena.tokens import Voter

__all__ = ["Arena", "ArenaLeaderboard", "BattleView", "Reveal", "Voter", "rate_votes"]
