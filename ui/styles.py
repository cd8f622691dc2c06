"""The studio's look: Gradio theme, CSS (status bar, parameter tables, narrow screens) and the Ctrl+Enter shortcut."""

from __future__ import annotations

import gradio as gr

THEME = gr.themes.Soft(
    primary_hue="indigo",
    secondary_hue="slate",
    neutral_hue="slate",
    radius_size="md",
    text_size="md",
    # System fonts only: the studio must not fetch web fonts (nothing at run time reaches the internet).
    font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
)

CSS = """
.gradio-container { width: 100% !important; max-width: 1440px !important; margin: 0 auto; }
#ig-header { display: flex; align-items: baseline; justify-content: space-between; flex-wrap: wrap; gap: 4px 16px; }
#ig-header h1 { font-size: 1.35rem; font-weight: 700; margin: 0; }
#ig-header .ig-tagline { color: var(--body-text-color-subdued); font-size: .9rem; margin-left: .6rem; }
#ig-header .ig-user { font-size: .9rem; color: var(--body-text-color-subdued); }
#ig-header .ig-user a { margin-left: .5rem; }
#generate, #cancel { min-height: 44px; }
.ig-status { display: flex; align-items: center; gap: 12px; min-height: 44px; padding: 6px 10px;
  border: 1px solid var(--border-color-primary); border-radius: var(--radius-md);
  background: var(--block-background-fill); }
.ig-status-body { flex: 1; min-width: 0; }
.ig-status-text { font-size: .95rem; overflow-wrap: anywhere; }
.ig-failed { border-color: var(--error-border-color, #ef4444); background: var(--error-background-fill, #fef2f2); }
.ig-failed .ig-status-text { color: var(--error-text-color, #b91c1c); font-weight: 600; }
.ig-done .ig-status-text::before { content: "\\2713  "; color: #16a34a; font-weight: 700; }
.ig-bar { height: 6px; margin-top: 6px; border-radius: 3px; background: var(--neutral-200); overflow: hidden; }
.ig-bar > div { height: 100%; background: var(--color-accent); transition: width .25s ease; }
.ig-bar-wait > div { width: 30%; animation: ig-wait 1.2s ease-in-out infinite; }
@keyframes ig-wait { 0% { margin-left: -30%; } 100% { margin-left: 100%; } }
.ig-step-preview { width: 64px; height: 64px; object-fit: cover; border-radius: 6px; image-rendering: auto;
  border: 1px solid var(--border-color-primary); }
.ig-params { width: 100%; border-collapse: collapse; font-size: .88rem; margin: 0; border: none !important; }
.ig-params tr, .ig-params th, .ig-params td { border: none !important; background: none; }
.ig-params th { text-align: left; font-weight: 600; padding: 4px 8px 4px 0; white-space: nowrap; vertical-align: top;
  color: var(--body-text-color-subdued); width: 1%; }
.ig-params td { padding: 4px 0; overflow-wrap: anywhere; }
.ig-params tr + tr th, .ig-params tr + tr td { border-top: 1px solid var(--border-color-primary) !important; }
.ig-compare td { width: 45%; padding-right: 8px; }
.ig-compare tr.ig-diff td { background: var(--color-accent-soft); }
#compare-a img, #compare-b img { width: 100%; height: 100%; object-fit: contain; }
.ig-empty { color: var(--body-text-color-subdued); font-size: .9rem; }
.ig-source { margin: 0 0 6px; }
.ig-pager { align-items: center; }
.ig-pager .ig-page { text-align: center; }
@media (max-width: 640px) {
  #ig-header .ig-tagline { display: none; }
  #ig-tabs button[role=tab] { padding-left: 8px; padding-right: 8px; }
  /* Gradio's gallery columns are at least 100 px wide: narrower ones, so that a phone does not scroll sideways. */
  #history .grid-container { --grid-cols: 3 !important; }
  #results .grid-container { --grid-cols: 2 !important; }
  #history .grid-container, #results .grid-container {
    grid-template-columns: repeat(var(--grid-cols), minmax(0, 1fr)) !important; }
  #compare-a, #compare-b { height: 220px !important; }
  .ig-actions { flex-direction: row !important; flex-wrap: wrap; }
  .ig-actions > * { flex: 1 1 40% !important; min-width: 40% !important; }
}
"""

# Ctrl+Enter (Cmd+Enter on macOS) generates from anywhere on the page, as in other studios.
JS = """
() => {
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || !(event.ctrlKey || event.metaKey)) return;
    const button = document.querySelector("#generate");
    if (button && !button.disabled) {
      event.preventDefault();
      button.click();
    }
  });
}
"""
