"""What the studio's HTML says, and that nothing a user typed or a PNG carried becomes markup."""

from __future__ import annotations

from image_gen.history import HistoryImage
from pipelines.params import GenerationParams
from ui.views import compare_html, parameters_html, png_info_html, status_html


def _image(prompt: str, seed: int) -> HistoryImage:
    params = GenerationParams(
        prompt=prompt,
        model="tiny-sd",
        width=32,
        height=48,
        steps=4,
        guidance_scale=7.5,
        scheduler="dpmpp_2m_karras",
        seed=seed,
    )
    return HistoryImage(
        id=f"local.job_{seed}", job_id="local.job", params=params, model_hash="4b02784f5b", created_at=0.0
    )


def test_status_line_shows_progress_and_only_our_own_previews() -> None:
    running = status_html("running", "Step 2 of 8", fraction=0.25, preview="data:image/jpeg;base64,AAAA")
    assert 'data-state="running"' in running and 'aria-valuenow="25"' in running and "<img" in running
    assert "<img" not in status_html("running", "Step 2 of 8", preview="javascript:alert(1)")
    assert "ig-bar-wait" in status_html("queued", "Queued: next up")
    assert "ig-bar" not in status_html("done", "Done")


def test_parameters_and_comparison_escape_what_users_typed() -> None:
    a, b = _image("<script>alert(1)</script> a fox", 1), _image("<script>alert(1)</script> a fox", 2)

    shown = parameters_html(a)
    compared = compare_html(a, b)

    assert "<script>" not in shown + compared and "&lt;script&gt;" in shown
    assert "DPM++ 2M Karras" in shown and "32x48" in shown and "tiny-sd [4b02784f5b]" in shown
    assert compared.count('class="ig-diff"') == 1  # only the seeds differ
    assert "Pick two images" in compare_html(a, None)


def test_png_info_lists_known_fields_then_the_studios_own() -> None:
    html = png_info_html({"prompt": "a <b>cat</b>", "steps": 20, "extra": {"Hires upscale": "2"}}, "a1111")
    assert "AUTOMATIC1111" in html and "&lt;b&gt;cat" in html and "Hires upscale" in html
    assert "no generation parameters" in png_info_html({"extra": {}}, "none")
