"""Generate the bundled calibration set: seeded synthetic images and question/answer chats.

    python -m tlq.data.make_bundled [OUT_DIR] [--seed N]

writes OUT_DIR/calib.jsonl and OUT_DIR/images/*.png (default: tlq/data/bundled). The images
are simple PIL drawings (coloured shapes, counts, positions, characters) at sizes from 56 to
160 px, so the set is small enough to ship and the answers are exactly right.
"""
from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from tlq.atomic import write_file_atomic

COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
          "purple": (140, 60, 180), "orange": (245, 140, 30), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
SIZES = ((56, 56), (64, 96), (80, 80), (96, 64), (112, 112), (128, 96), (144, 112), (160, 120), (160, 160))
POSITIONS = {(0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left", (1, 1): "center",
             (1, 2): "right", (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right"}
N_IMAGE_SAMPLES = 26
N_TEXT_SAMPLES = 6


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=color)


def canvas(rnd: random.Random):
    w, h = rnd.choice(SIZES)
    shade = rnd.choice((255, 245, 235))
    img = Image.new("RGB", (w, h), (shade, shade, shade))
    return img, ImageDraw.Draw(img)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


# Each task draws one image and returns (question, answer, question_type).
def task_color(rnd, img, draw):
    shape, color = rnd.choice(SHAPES), rnd.choice(list(COLORS))
    w, h = img.size
    draw_shape(draw, shape, w / 2, h / 2, min(w, h) / 3, COLORS[color])
    return f"What colour is the {shape}?", f"The {shape} is {color}.", "color"


def task_shape(rnd, img, draw):
    shape, color = rnd.choice(SHAPES), rnd.choice(list(COLORS))
    w, h = img.size
    draw_shape(draw, shape, w / 2, h / 2, min(w, h) / 3, COLORS[color])
    return "What shape is in the picture?", f"It is a {color} {shape}.", "shape"


def task_count(rnd, img, draw):
    shape, color, n = rnd.choice(SHAPES), rnd.choice(list(COLORS)), rnd.randint(1, 5)
    w, h = img.size
    cells = rnd.sample(sorted(POSITIONS), n)  # one shape per cell of a 3x3 grid: no overlaps
    for row, col in cells:
        draw_shape(draw, shape, (col + 0.5) * w / 3, (row + 0.5) * h / 3, min(w, h) / 8, COLORS[color])
    verb = "is" if n == 1 else "are"
    return f"How many {shape}s are there?", f"There {verb} {_plural(n, shape)}.", "count"


def task_position(rnd, img, draw):
    shape, color = rnd.choice(SHAPES), rnd.choice(list(COLORS))
    (row, col), where = rnd.choice(sorted(POSITIONS.items()))
    w, h = img.size
    draw_shape(draw, shape, (col + 0.5) * w / 3, (row + 0.5) * h / 3, min(w, h) / 7, COLORS[color])
    return f"Where is the {color} {shape}?", f"The {color} {shape} is in the {where} of the image.", "position"


def task_character(rnd, img, draw):
    char = rnd.choice("0123456789ABCDEFGHJKLMNPRSTUVWXYZ")
    w, h = img.size
    font = ImageFont.load_default(size=int(min(w, h) * 0.7))
    draw.text((w / 2, h / 2), char, fill=COLORS[rnd.choice(("black", "blue", "red"))], font=font, anchor="mm")
    kind = "digit" if char.isdigit() else "letter"
    return "What character is written in the image?", f"The {kind} {char}.", "ocr"


def task_pair(rnd, img, draw):
    (s1, s2), (c1, c2) = rnd.sample(SHAPES, 2), rnd.sample(list(COLORS), 2)
    w, h = img.size
    r = min(w / 5, h / 3)
    draw_shape(draw, s1, w / 4, h / 2, r, COLORS[c1])
    draw_shape(draw, s2, 3 * w / 4, h / 2, r, COLORS[c2])
    return "Describe the image.", f"A {c1} {s1} on the left and a {c2} {s2} on the right.", "describe"


IMAGE_TASKS = (task_color, task_shape, task_count, task_position, task_character, task_pair)


def text_task(rnd: random.Random, i: int):
    a, b = rnd.randint(2, 40), rnd.randint(2, 40)
    word = rnd.choice(("vision", "square", "model", "yellow", "circle", "answer"))
    shape = rnd.choice(SHAPES)
    sides = {"circle": "no straight sides", "square": "four sides", "triangle": "three sides"}[shape]
    options = (
        (f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."),
        (f"Which number is larger, {a} or {b}?", f"{max(a, b)} is larger." if a != b else "They are equal."),
        (f"How many sides does a {shape} have?", f"A {shape} has {sides}."),
        (f"Write the word {word} backwards.", f"{word[::-1]}"),
        (f"How many letters are in the word {word}?", f"The word {word} has {len(word)} letters."),
        (f"Is {a} an even number?", "Yes, it is even." if a % 2 == 0 else "No, it is odd."),
    )
    question, answer = options[i % len(options)]
    return question, answer, "text"


def build_samples(seed: int = 0):
    """Yield (record, png_bytes or None) for every sample of the set."""
    rnd = random.Random(seed)
    for i in range(N_IMAGE_SAMPLES):
        task = IMAGE_TASKS[i % len(IMAGE_TASKS)]
        img, draw = canvas(rnd)
        question, answer, qtype = task(rnd, img, draw)
        sample_id = f"{qtype}-{i:02d}"
        # vary the layout: image after the text for some, a system turn or a follow-up for others
        parts = [{"type": "image"}, {"type": "text", "text": question}]
        if i % 5 == 3:
            parts.reverse()
        messages = [{"role": "user", "content": parts}]
        if i % 7 == 2:
            messages.insert(0, {"role": "system", "content": "Answer in one short sentence."})
        if i % 9 == 4:
            messages += [{"role": "assistant", "content": [{"type": "text", "text": "I can see the image."}]},
                         {"role": "user", "content": [{"type": "text", "text": question}]}]
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
        yield {"id": sample_id, "question_type": qtype, "images": [f"images/{sample_id}.png"],
               "messages": messages}, buf.getvalue()
    for i in range(N_TEXT_SAMPLES):
        question, answer, qtype = text_task(rnd, i)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        yield {"id": f"{qtype}-{N_IMAGE_SAMPLES + i:02d}", "question_type": qtype, "images": [],
               "messages": messages}, None


def write_bundled(out_dir, seed: int = 0) -> Path:
    """Write the set into `out_dir` (replacing older PNGs there); return the JSONL path."""
    out_dir = Path(out_dir)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    for old in images.glob("*.png"):
        old.unlink()
    lines = []
    for record, png in build_samples(seed):
        if png is not None:
            write_file_atomic(out_dir / record["images"][0], png)
        lines.append(json.dumps(record, ensure_ascii=False))
    path = out_dir / "calib.jsonl"
    write_file_atomic(path, ("\n".join(lines) + "\n").encode())
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=str(Path(__file__).resolve().parent / "bundled"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_bundled(args.out_dir, args.seed))


if __name__ == "__main__":
    main()
