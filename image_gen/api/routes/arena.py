"""The arena over REST: a voter credential, battles of two anonymous images, votes that answer with the reveal, and
the leaderboard. Nothing a route returns before the vote names a contender (docs/arena.md)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Cookie, Depends, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from image_gen.api.deps import CurrentCaller
from image_gen.api.errors import ERROR_RESPONSES
from image_gen.arena import Arena, ArenaLeaderboard, BattleView, Reveal, Voter
from image_gen.arena.tokens import VOTER_COOKIE, VOTER_COOKIE_AGE_S
from image_gen.settings import ArenaContender

router = APIRouter(prefix="/v1/arena", tags=["arena"], responses=ERROR_RESPONSES)

BattleId = Annotated[str, Path(max_length=64, description="the battle's id")]


async def get_arena(request: Request) -> Arena:
    return request.app.state.arena


ArenaService = Annotated[Arena, Depends(get_arena)]


async def get_voter(
    request: Request,
    caller: CurrentCaller,
    arena: ArenaService,
    x_arena_voter: Annotated[
        str | None, Header(max_length=100, description="a credential from POST /v1/arena/voters")
    ] = None,
    voter_cookie: Annotated[
        str | None, Cookie(alias=VOTER_COOKIE, max_length=100, description="the credential, for browsers")
    ] = None,
) -> Voter:
    """The voter: the credential in `X-Arena-Voter` (or the cookie), acting for the caller, from its address."""
    address = request.client.host if request.client else None
    return arena.voter(x_arena_voter or voter_cookie, caller.owner, address)


CurrentVoter = Annotated[Voter, Depends(get_voter)]


# --- schemas ------------------------------------------------------------------------------------------------------


class VoterCredential(BaseModel):
    voter: str = Field(description="send it as the X-Arena-Voter header with every arena request")


class BattleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(
        default=None,
        max_length=1000,
        description="what both contenders draw (blank: a built-in suite prompt)",
    )


class BattleImageLinks(BaseModel):
    a: str
    b: str


class BattleResponse(BaseModel):
    """A battle as the voter sees it: the prompt and two images, never who made them."""

    id: str
    prompt: str
    status: Literal["generating", "ready", "failed"]
    expires_at: int = Field(description="Unix time after which the battle's token no longer votes")
    vote_in_s: float | None = Field(
        description="seconds until a vote counts (null until both images are ready)"
    )
    images: BattleImageLinks = Field(description="GET them once status is ready")
    token: str | None = Field(default=None, description="the battle's vote token: returned once, at creation")

    @classmethod
    def of(cls, view: BattleView) -> BattleResponse:
        base = f"/v1/arena/battles/{view.id}/images"
        return cls(
            id=view.id,
            prompt=view.prompt,
            status=view.status,
            expires_at=int(view.expires_at),
            vote_in_s=None if view.vote_in_s is None else round(view.vote_in_s, 3),
            images=BattleImageLinks(a=f"{base}/a", b=f"{base}/b"),
            token=view.token,
        )


class VoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(max_length=200, description="the token the battle came with")
    choice: Literal["a", "b", "tie", "both_bad"] = Field(
        description="A is better, B is better, tie, both are bad"
    )


class RevealResponse(BaseModel):
    """The vote as recorded, and the contenders behind A and B."""

    battle_id: str
    choice: Literal["a", "b", "tie", "both_bad"]
    winner: Literal["model_a", "model_b", "tie", "tie (bothbad)"]
    model_a: ArenaContender
    model_b: ArenaContender
    image_a: str
    image_b: str

    @classmethod
    def of(cls, reveal: Reveal) -> RevealResponse:
        return cls.model_validate(reveal, from_attributes=True)


class LeaderboardRow(BaseModel):
    rank: int = Field(description="1 + the contenders whose interval lies wholly above this one's")
    contender: str
    rating: float
    lower: float = Field(description="95% bootstrap interval")
    upper: float
    battles: int
    wins: int
    ties: int
    losses: int


class LeaderboardResponse(BaseModel):
    """Bradley-Terry ratings (Elo scale) with bootstrap intervals; a ratings file for `image-gen leaderboard`."""

    leaderboard: list[LeaderboardRow]
    votes: int = Field(description="votes counted")
    excluded_votes: int = Field(description="votes of voters flagged as outliers, left out")
    flagged_voters: int
    include_flagged: bool
    anchor: str | None = Field(description="the contender pinned at 1000 (null: the mean is 1000)")
    rounds: int = Field(description="bootstrap rounds")
    computed_at: float

    @classmethod
    def of(cls, board: ArenaLeaderboard) -> LeaderboardResponse:
        return cls(
            leaderboard=[LeaderboardRow.model_validate(row, from_attributes=True) for row in board.rows],
            votes=board.votes,
            excluded_votes=board.excluded_votes,
            flagged_voters=len(board.flagged_voters),
            include_flagged=board.include_flagged,
            anchor=board.anchor,
            rounds=board.rounds,
            computed_at=board.computed_at,
        )


# --- routes -------------------------------------------------------------------------------------------------------


@router.post("/voters", status_code=201, response_model=VoterCredential)
def new_voter(
    request: Request, response: Response, caller: CurrentCaller, arena: ArenaService
) -> VoterCredential:
    """A new anonymous voter credential, also set as a cookie. Per-voter caps count against it."""
    credential = arena.new_voter()
    response.set_cookie(
        VOTER_COOKIE,
        credential,
        max_age=VOTER_COOKIE_AGE_S,
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
    )
    return VoterCredential(voter=credential)


@router.post("/battles", status_code=201, response_model=BattleResponse)
def new_battle(voter: CurrentVoter, arena: ArenaService, body: BattleRequest | None = None) -> JSONResponse:
    """Start a battle: two contenders, sides at random, the same prompt and seed, generated through the queue.
    The response carries the vote token; poll GET /v1/arena/battles/{id} until `status` is `ready`."""
    battle = BattleResponse.of(arena.new_battle(voter, body.prompt if body else None))
    return JSONResponse(
        battle.model_dump(mode="json"),
        status_code=201,
        headers={"Location": f"/v1/arena/battles/{battle.id}"},
    )


@router.get("/battles/{battle_id}", response_model=BattleResponse)
def get_battle(battle_id: BattleId, voter: CurrentVoter, arena: ArenaService) -> BattleResponse:
    """The voter's battle: whether its images are ready and when a vote will count."""
    return BattleResponse.of(arena.battle(voter, battle_id))


@router.get(
    "/battles/{battle_id}/images/{side}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "the image, without metadata"}},
)
def get_battle_image(
    battle_id: BattleId, side: Literal["a", "b"], voter: CurrentVoter, arena: ArenaService
) -> Response:
    """Image A or B of a ready battle, as a PNG stripped of the text chunks that would name its model."""
    return Response(
        arena.image(voter, battle_id, side),
        media_type="image/png",
        headers={"Cache-Control": "private, max-age=3600"},
    )


@router.post("/votes", status_code=201, response_model=RevealResponse)
def vote(body: VoteRequest, voter: CurrentVoter, arena: ArenaService) -> RevealResponse:
    """Vote on a battle with its token (once; after both images were shown for `arena_min_view_s`) and learn who
    was A and who was B."""
    return RevealResponse.of(arena.vote(voter, body.token, body.choice))


@router.get("/leaderboard", response_model=LeaderboardResponse)
def get_leaderboard(
    caller: CurrentCaller,
    arena: ArenaService,
    include_flagged: Annotated[
        bool, Query(description="count the votes of voters flagged as outliers")
    ] = False,
) -> LeaderboardResponse:
    """Ratings, 95% intervals and ranks from every vote; outlier voters are left out unless asked for."""
    return LeaderboardResponse.of(arena.leaderboard(include_flagged=include_flagged))
