"""A sweep's contact sheet: one block per cell on a grid whose rows are the first axis's values and whose
columns are the other axes' values (labelled on the margins); in each block the cell's candidates downscaled,
each with its seed and sweep score under it, the cell's winner framed, and the cell's mean and rank below.
PIL only, with the font that ships with Pillow."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFont

BACKGROUND, INK, MUTED, WINNER = (250, 250, 248), (20, 20, 20), (110, 110, 110), (230, 160, 0)
PAD, FRAME = 8, 4


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes: the bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


def _score(value) -> str:
    return "unscored" if value is None else f"{value:+.2f}"


def render(result: dict, images: dict[tuple[int, int], bytes], tile: int = 256, title: str = "") -> bytes:
    """The PNG of a finished sweep's `result` (SweepResult as a dict); `images[(cell, seed)]` holds each
    candidate's PNG; `tile` is the longest side of a downscaled candidate."""
    axes, cells = result["axes"], result["cells"]
    row_axis, col_axes = (axes[0], axes[1:]) if len(axes) >= 2 else (None, axes)
    rows = list(dict.fromkeys(c["labels"][row_axis] for c in cells)) if row_axis else [""]
    n_cols = len(cells) // len(rows)
    per_cell = max(1, max(len(c["candidates"]) for c in cells))
    font, small = _font(max(11, tile // 14)), _font(max(10, tile // 18))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = _text_size(probe, "Ag+0.00", font)[1] + 4
    small_line = _text_size(probe, "Ag+0.00", small)[1] + 4

    summaries = [f"mean {_score(c.get('mean'))}  best {_score(c.get('best'))}  #{c.get('rank')}" for c in cells]
    captions = [f"seed {k['seed']}: {_score(k.get('score'))}" for c in cells for k in c["candidates"]]
    widest_caption = max((_text_size(probe, t, small)[0] for t in captions), default=0)
    tile_w = max(tile, widest_caption)  # a caption never runs into the next tile
    block_w = max(per_cell * (tile_w + PAD) + PAD, max(_text_size(probe, t, font)[0] for t in summaries) + 2 * PAD)
    block_h = tile + PAD + small_line + line + PAD
    row_labels = [f"{row_axis}={r}" for r in rows] if row_axis else [""]
    left = max(_text_size(probe, t, font)[0] for t in row_labels) + 2 * PAD if row_axis else PAD
    col_lines = max(1, len(col_axes))
    top = line + PAD + col_lines * line + PAD  # the title, then one line per column axis
    width, height = left + n_cols * block_w + PAD, top + len(rows) * block_h + PAD
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    head = title or f"{result.get('mode', '')} sweep: {len(cells)} cells x {per_cell} seeds"
    if row_axis:
        head += f"; rows: {row_axis}; columns: {', '.join(col_axes)}"
    elif col_axes:
        head += f"; columns: {', '.join(col_axes)}"
    draw.text((PAD, PAD // 2), head, fill=INK, font=font)

    for ci, cell in enumerate(cells):
        r, c = divmod(ci, n_cols)
        x0, y0 = left + c * block_w, top + r * block_h
        if r == 0:
            for k, axis in enumerate(col_axes):
                draw.text((x0 + PAD, line + PAD + k * line), f"{axis}={cell['labels'][axis]}", fill=INK, font=font)
        if c == 0 and row_axis:
            draw.text((PAD, y0 + tile // 2), row_labels[r], fill=INK, font=font)
        draw.rectangle((x0 + 2, y0 + 2, x0 + block_w - 2, y0 + block_h - 2), outline=(215, 215, 210))
        for k, cand in enumerate(cell["candidates"]):
            tx, ty = x0 + PAD + k * (tile_w + PAD), y0 + PAD
            png = images.get((cell["cell"], cand["seed"]))
            if png is not None:
                thumb = Image.open(io.BytesIO(png)).convert("RGB")
                thumb.thumbnail((tile, tile), Image.LANCZOS)
                sheet.paste(thumb, (tx + (tile - thumb.width) // 2, ty + (tile - thumb.height) // 2))
            winner = cand["seed"] == cell.get("best_seed")
            if winner:
                draw.rectangle((tx - 2, ty - 2, tx + tile + 1, ty + tile + 1), outline=WINNER, width=FRAME)
                bw, bh = _text_size(draw, "BEST", small)
                draw.rectangle((tx, ty, tx + bw + 8, ty + bh + 8), fill=WINNER)
                draw.text((tx + 4, ty + 2), "BEST", fill=INK, font=small)
            caption = f"seed {cand['seed']}: {_score(cand.get('score'))}"
            draw.text((tx, ty + tile + 4), caption, fill=INK if winner else MUTED, font=small)
        draw.text((x0 + PAD, y0 + PAD + tile + small_line + 2), summaries[ci], fill=INK, font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
