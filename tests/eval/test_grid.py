"""The caption grid: text wrapped to the tile width as the font measures it, long captions end in
"...", nothing is cut silently, and the labels say which caption is which."""

import pytest
from PIL import Image, ImageFont

from vlm.eval.grid import ELLIPSIS, MAX_TILE, MIN_TILE, caption_grid, load_font, tile_lines, wrap_text

LONG = "a small red circle to the left of a large blue square above a green triangle " * 6


@pytest.fixture(scope="module")
def font():
    return load_font(14)


def test_default_font_is_sized_when_pillow_allows(font):
    assert isinstance(font, ImageFont.FreeTypeFont) and font.size == 14  # Pillow >= 10.1 with FreeType


@pytest.mark.parametrize("width", [60, 120, 256])
def test_wrapped_lines_fit_the_width_and_keep_every_word(font, width):
    text = "a small red circle to the left of a large blue square with a supercalifragilistic border"
    lines = wrap_text(text, font, width, max_lines=100)
    assert len(lines) > 1 and all(font.getlength(line) <= width for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")  # nothing dropped (long words are broken)
    assert wrap_text("", font, width, max_lines=3) == [""]


def test_long_captions_are_ellipsized_within_the_width(font):
    lines = wrap_text(LONG, font, 200, max_lines=3)
    assert len(lines) == 3 and lines[-1].endswith(ELLIPSIS)
    assert all(font.getlength(line) <= 200 for line in lines)
    assert LONG.startswith(" ".join(lines[:-1]))
    short = wrap_text("a red circle", font, 200, max_lines=3)
    assert short == ["a red circle"]  # fits: no ellipsis


def test_tile_text_is_labelled_and_fits(font):
    lines = [line for line, _ in tile_lines(LONG, "a blue square", font, 256, max_lines=4)]
    assert lines[0] == "predicted (differs)" and lines[5] == "reference" and lines[6:] == ["a blue square"]
    assert lines[4].endswith(ELLIPSIS) and all(font.getlength(line) <= 256 for line in lines)
    matched = tile_lines("A red circle.", "a red circle", font, 256, max_lines=4)
    assert matched[0][0] == "predicted (matches)" and matched[0][1] != tile_lines("x", "y", font, 256, max_lines=4)[0][1]


def test_grid_keeps_aspect_and_leaves_room_for_the_text(font):
    items = [(Image.new("RGB", (16, 16), (250, 0, 0)), "a red circle", "a red circle."),
             (Image.new("RGB", (640, 480), (0, 0, 250)), LONG, "a blue square")]
    grid = caption_grid(items, columns=2, max_lines=4)
    side, pad = MAX_TILE, 8  # 640 * 3 is clamped to MAX_TILE
    assert grid.size[0] == 2 * (side + pad) + pad
    # the photo keeps its aspect ratio inside its square: grey backdrop above it, the photo in the middle
    centre_x = 2 * pad + side + side // 2
    assert grid.getpixel((centre_x, pad + 2)) == (235, 235, 235)
    assert grid.getpixel((centre_x, pad + side // 2)) == (0, 0, 250)
    # both tiles have text under them: dark pixels in each column of the text area
    text_area = grid.crop((0, pad + side, grid.width, grid.height)).convert("L")
    for left in (0, side + pad):
        assert text_area.crop((left, 0, left + side + pad, text_area.height)).getextrema()[0] < 100
    lines = tile_lines(LONG, "a blue square", font, side, max_lines=4)
    assert grid.height >= pad + side + len(lines) * font.size  # 8 lines of text fit below the image


def test_small_images_get_a_readable_tile():
    grid = caption_grid([(Image.new("RGB", (16, 16)), "x", "y")], scale=3)
    assert grid.width >= MIN_TILE  # 16 * 3 would leave no room for words
