# A judge of sample videos for the synthetic moving-shapes vocabulary (launch/job/data.py): does a clip show ONE
# object of the prompted colour and shape, moving in the prompted direction, on a dark background? In the
# image-to-video mode (captions "a shape moving left", data.dataset=synthetic_i2v) the colour and shape are the
# conditioning image's, and the object must also start where the image has it.
#
#   python bench/judge.py runs/default/samples            # every *.gif under it, prompt read from the file name
#   python bench/judge.py --i2v PROMPTS runs/i2v-demo/samples   # image<TAB>prompt lines; sample k is kkk_*.gif
#   python bench/judge.py --validate                       # ground-truth clips (all right) and noise (all wrong)
#
# It lives in the package because the training job scores its validation samples with it (sample.every,
# launch/job/validation.py); bench/judge.py is its command line.
#
# Per clip: the background is the median of the border pixels; foreground = pixels far from it; colour = the
# nearest dataset colour to the foreground's mean; one object = the largest 4-connected component holds >= 85% of
# the foreground in >= 75% of the frames; shape = the best template fit (circle, square, triangle) of that component
# over centre and size, summed over the frames; direction = the sign of the larger axis of the centroid's
# displacement over the clip. Image-to-video: the image is judged as a one-frame clip (its colour, shape and the
# object's centroid); start = the sample's first-frame centroid within START_TOLERANCE of the frame side of it.
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from launch.job.data import COLORS, MOTIONS, SHAPES, SyntheticShapes, SyntheticShapesI2V, _shape_mask

FG_THRESHOLD = 0.25  # max-channel distance from the background (colours in [0, 1])
ONE_OBJECT_SHARE = 0.85
MIN_MOVE = 0.08  # centroid displacement over the clip, as a share of the frame size
START_TOLERANCE = 0.125  # image-to-video: first-frame centroid distance from the image's, as a share of the side
PROMPT = re.compile(r"a[_ ](\w+)[_ ](\w+)[_ ]moving[_ ](\w+)")
MOTION_PROMPT = re.compile(r"a[_ ]shape[_ ]moving[_ ](\w+)")


@dataclass
class Verdict:
    color: str
    shape: str
    direction: str
    one_object: bool
    dark_background: bool
    start: tuple[float, float] | None = None  # the object's centroid in its first frame, (y / H, x / W)

    def matches(self, color: str, shape: str, direction: str) -> dict[str, bool]:
        return {
            "color": self.color == color,
            "shape": self.shape == shape,
            "one object": self.one_object and self.dark_background,
            "direction": self.direction == direction,
        }

    def matches_image(self, image: Verdict, direction: str) -> dict[str, bool]:
        """Image-to-video: colour and shape are the image's (an image without one object matches nothing), the
        object starts where the image has it, and moves as the caption says."""
        has = image.one_object and image.dark_background
        near = has and self.start is not None and np.hypot(*np.subtract(self.start, image.start)) <= START_TOLERANCE
        return {
            "color": has and self.color == image.color,
            "shape": has and self.shape == image.shape,
            "one object": self.one_object and self.dark_background,
            "start": bool(near),
            "direction": self.direction == direction,
        }


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a (H, W) bool mask, largest first, as bool masks."""
    label = np.zeros(mask.shape, dtype=np.int32)
    comps = []
    for y, x in zip(*np.nonzero(mask), strict=True):
        if label[y, x]:
            continue
        n = len(comps) + 1
        stack, member = [(y, x)], []
        label[y, x] = n
        while stack:
            cy, cx = stack.pop()
            member.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not label[ny, nx]:
                    label[ny, nx] = n
                    stack.append((ny, nx))
        comps.append(label == n)
    return sorted(comps, key=lambda c: -int(c.sum()))


def _block_size(frames: np.ndarray) -> int:
    """The nearest-upscaling factor of written samples (launch/job/media.py), so the judge works at model resolution."""
    for s in (16, 8, 4, 2):
        if frames.shape[1] % s == 0 and frames.shape[2] % s == 0:
            small = frames[:, ::s, ::s]
            if np.array_equal(np.repeat(np.repeat(small, s, 1), s, 2), frames):
                return s
    return 1


def _shape_fit(mask: np.ndarray) -> dict[str, float]:
    """Best intersection-over-union of each of the dataset's shapes, searched over centre and size."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    area = mask.sum()
    best = dict.fromkeys(SHAPES, 0.0)
    for shape in SHAPES:
        for r in np.linspace(0.6, 1.4, 9) * np.sqrt(area / {"circle": np.pi, "square": 4.0, "triangle": 2.0}[shape]):
            for dy in np.arange(-1.0, 1.01, 0.25):
                for dx in np.arange(-0.5, 0.51, 0.25):
                    t = _shape_mask(shape, h, w, cy + dy, cx + dx, r)
                    best[shape] = max(best[shape], (t & mask).sum() / max((t | mask).sum(), 1))
    return best


def judge(frames: np.ndarray) -> Verdict:
    """frames: (F, H, W, 3) uint8 (as read from a sample gif/mp4) or float in [0, 1]."""
    f = frames.astype(np.float32) / (255.0 if frames.dtype == np.uint8 else 1.0)
    s = _block_size(frames)
    f = f[:, ::s, ::s]
    T, H, W, _ = f.shape
    border = np.concatenate([f[:, 0], f[:, -1], f[:, :, 0], f[:, :, -1]], axis=1).reshape(-1, 3)
    bg = np.median(border, axis=0)
    fg = np.abs(f - bg).max(-1) > FG_THRESHOLD  # (T, H, W)
    palette = {n: np.asarray(c) for n, c in COLORS.items()}
    color = "none"
    if fg.any():
        mean = f[fg].mean(0)
        color = min(palette, key=lambda n: float(((palette[n] - mean) ** 2).sum()))
    one, centroids = 0, []
    fit = dict.fromkeys(SHAPES, 0.0)
    for t in range(T):
        comps = _components(fg[t])
        if not comps:
            continue
        main = comps[0]
        if main.sum() >= ONE_OBJECT_SHARE * fg[t].sum() and main.sum() >= 2:
            one += 1
        ys, xs = np.nonzero(main)
        centroids.append((ys.mean(), xs.mean()))
        for shape, iou in _shape_fit(main).items():  # every frame's fit counts; the best total wins
            fit[shape] += iou
    direction = "none"
    if len(centroids) >= 2:
        dy, dx = np.subtract(centroids[-1], centroids[0])
        if max(abs(dy) / H, abs(dx) / W) >= MIN_MOVE:
            direction = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
    one_object, dark = one >= 0.75 * T, bool(bg.max() < 0.3)
    if not (one_object and dark):  # colour, shape and motion belong to an object: noise or several blobs have none
        return Verdict("none", "none", "none", one_object, dark)
    shape = max(SHAPES, key=lambda k: fit[k])
    start = (float((centroids[0][0] + 0.5) / H), float((centroids[0][1] + 0.5) / W))
    return Verdict(color, shape, direction, True, True, start)


def parse_prompt(text: str) -> tuple[str, str, str] | None:
    m = PROMPT.search(text.lower())
    if not m or m[1] not in COLORS or m[2] not in SHAPES or m[3] not in MOTIONS:
        return None
    return m[1], m[2], m[3]


def parse_motion_prompt(text: str) -> str | None:
    m = MOTION_PROMPT.search(text.lower())
    return m[1] if m and m[1] in MOTIONS else None


def read_frames(path: Path) -> np.ndarray:
    import imageio.v2 as imageio

    return np.stack([np.asarray(fr)[..., :3] for fr in imageio.mimread(str(path))])


def score(items: list[tuple[str, np.ndarray]]) -> list[dict]:
    """[(prompt, frames)] -> one row per clip: what the judge saw and which attributes match the prompt."""
    rows = []
    for prompt, frames in items:
        want = parse_prompt(prompt)
        if want is None:
            raise ValueError(f"prompt {prompt!r} is not 'a <colour> <shape> moving <direction>' of the vocabulary")
        v = judge(frames)
        ok = v.matches(*want)
        rows.append({"prompt": prompt, "verdict": v, "ok": ok, "score": sum(ok.values()) / len(ok)})
    return rows


def score_i2v(items: list[tuple[str, np.ndarray, np.ndarray]]) -> list[dict]:
    """[(caption, image (H, W, 3), frames)] -> one row per clip, judged against its conditioning image."""
    rows = []
    for prompt, image, frames in items:
        direction = parse_motion_prompt(prompt)
        if direction is None:
            raise ValueError(f"prompt {prompt!r} is not 'a shape moving <direction>' (the image-to-video captions)")
        seen = judge(image[None])
        v = judge(frames)
        ok = v.matches_image(seen, direction)
        label = f"{prompt} (image: {seen.color} {seen.shape} at {_where(seen.start)})"
        rows.append({"prompt": label, "verdict": v, "ok": ok, "score": sum(ok.values()) / len(ok)})
    return rows


def _where(start: tuple[float, float] | None) -> str:
    return "-" if start is None else f"y={start[0]:.2f} x={start[1]:.2f}"


def print_table(rows: list[dict]) -> None:
    keys = ["color", "shape", "one object", *(["start"] if rows and "start" in rows[0]["ok"] else []), "direction"]
    print(f"| prompt | {' | '.join(k.replace('color', 'colour') for k in keys)} | score |")
    print("|---" * (len(keys) + 2) + "|")
    for r in rows:
        v, ok = r["verdict"], r["ok"]
        seen = {
            "color": v.color,
            "shape": v.shape,
            "direction": v.direction,
            "one object": "yes" if v.one_object and v.dark_background else "no",
            "start": _where(v.start),
        }
        cells = [f"{seen[k]} {'ok' if ok[k] else 'X'}" for k in keys]
        print(f"| {r['prompt']} | {' | '.join(cells)} | {r['score']:.2f} |")
    total = sum(r["score"] for r in rows) / max(len(rows), 1)
    perfect = sum(r["score"] == 1.0 for r in rows)
    print(f"\nmean score {total:.2f}; {perfect}/{len(rows)} clips right in every attribute")


def ground_truth(n: int, frames: int = 8, size: int = 16, seed: int = 1) -> list[tuple[str, np.ndarray]]:
    ds = SyntheticShapes(n, frames, size, size, seed)
    out = []
    for i in range(n):
        video, caption = ds[i]
        out.append((caption, ((video.permute(0, 2, 3, 1).numpy() + 1) / 2).clip(0, 1)))
    return out


def ground_truth_i2v(
    n: int, frames: int = 8, size: int = 16, seed: int = 1
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """[(caption, image, clip)] of the image-to-video dataset: the image is the clip's first frame."""
    ds = SyntheticShapesI2V(n, frames, size, size, seed)
    out = []
    for i in range(n):
        video, caption = ds[i]
        clip = ((video.permute(0, 2, 3, 1).numpy() + 1) / 2).clip(0, 1)
        out.append((caption, clip[0], clip))
    return out


def noise(prompts: list[str], frames: int = 8, size: int = 16, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(p, rng.uniform(0, 1, (frames, size, size, 3)).astype(np.float32)) for p in prompts]


def validation_i2v(n: int, seed: int = 1) -> dict[str, list[tuple[str, np.ndarray, np.ndarray]]]:
    """The image-to-video judge's checks: ground truth (all right), noise (all wrong), the image held still (right
    but for the direction), and each clip judged against the next clip's image (start, colour, shape mostly wrong)."""
    truth = ground_truth_i2v(n, seed=seed)
    shifted = [(p, truth[(i + 1) % n][1], clip) for i, (p, _, clip) in enumerate(truth)]
    return {
        "ground truth (SyntheticShapesI2V, 16x16, 8 frames)": truth,
        "uniform noise, same captions and images": [
            (p, image, clip) for (p, image, _), (_, clip) in zip(truth, noise([p for p, _, _ in truth]), strict=True)
        ],
        "the image held still for every frame": [(p, image, np.repeat(image[None], 8, 0)) for p, image, _ in truth],
        "each clip against the next clip's image": shifted,
    }


def read_i2v_samples(prompts_file: Path, samples: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The image<TAB>prompt lines of a prompts file (image paths relative to the file) with sample k's gif."""
    items = []
    lines = [ln for ln in prompts_file.read_text().splitlines() if ln.strip()]
    for k, line in enumerate(lines):
        image, _, prompt = line.partition("\t")
        gifs = sorted(samples.rglob(f"{k:03d}_*.gif"))
        if not gifs:
            raise FileNotFoundError(f"no sample {k:03d}_*.gif under {samples} (prompt {prompt.strip()!r})")
        path = Path(image.strip())
        path = path if path.is_absolute() else prompts_file.parent / path
        items.append((prompt.strip(), read_frames(path)[0], read_frames(gifs[0])))
    return items


def main() -> int:
    ap = argparse.ArgumentParser(description="Judge sample videos of the synthetic moving-shapes vocabulary.")
    ap.add_argument("samples", nargs="?", help="a directory of sample gifs (searched recursively)")
    ap.add_argument("--validate", action="store_true", help="judge ground-truth clips and noise instead")
    ap.add_argument("--i2v", metavar="PROMPTS", help="image-to-video: the prompts file (image<TAB>prompt lines)")
    args = ap.parse_args()
    if args.validate:
        truth = ground_truth(48)
        print("## ground truth (SyntheticShapes, 16x16, 8 frames)\n")
        print_table(score(truth))
        print("\n## uniform noise, same prompts\n")
        print_table(score(noise([p for p, _ in truth])))
        for title, items in validation_i2v(48).items():
            print(f"\n## image-to-video: {title}\n")
            print_table(score_i2v(items))
        return 0
    if not args.samples:
        ap.error("give a samples directory or --validate")
    if args.i2v:
        print_table(score_i2v(read_i2v_samples(Path(args.i2v), Path(args.samples))))
        return 0
    items = []
    for gif in sorted(Path(args.samples).rglob("*.gif")):
        want = parse_prompt(gif.stem)
        if want:
            items.append(("a {} {} moving {}".format(*want), read_frames(gif)))
    if not items:
        print(f"no sample gifs named after a vocabulary prompt under {args.samples}", file=sys.stderr)
        return 1
    print_table(score(items))
    return 0


if __name__ == "__main__":
    sys.exit(main())
