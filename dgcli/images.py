"""Images in prompts: decoding (Pillow), the reference's image processor, placeholder expansion.

Exactly what transformers 5.23.0 does with `Gemma4Processor` (the Pillow backend,
`Gemma4ImageProcessorPil`), so that pixels, and therefore tokens, agree:
- a path is opened with Pillow, EXIF-rotated and converted to RGB (`load_image`); a PIL image is
  taken as it is, its transparency composited onto white (`convert_to_rgb`);
- resized, keeping the aspect ratio, to the largest size whose sides are multiples of
  patch·pooling and that fits `max_soft_tokens`·pooling² patches (`resample`, bicubic by default);
- rescaled to [0, 1] (float64, then float32), cut into p×p patches (row-major, channels last in a
  patch) with their (x, y) positions, padded to max_patches (pixels 0, positions -1);
- in the rendered prompt each image placeholder becomes begin-of-image, one image token per soft
  token (patches / pooling²), end-of-image; the text is then tokenized as a whole.
Settings come from the checkpoint's preprocessor_config.json / processor_config.json.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import read_json
from .errors import DgError, first_line

MAX_PIXELS = 64_000_000  # decoded size we accept (Pillow's decompression-bomb guard is ~89M)
SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)  # what the reference's processor accepts


class ImageError(DgError):
    """An image the user gave that cannot be used (missing, not an image, too large, no vision tower)."""

    exit_code = 2


@dataclass
class ImageProcessor:
    patch_size: int = 16
    max_soft_tokens: int = 280
    pooling_kernel_size: int = 3
    do_resize: bool = True
    resample: int = 3  # PIL.Image.BICUBIC
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = False
    image_mean: list = field(default_factory=lambda: [0.0, 0.0, 0.0])
    image_std: list = field(default_factory=lambda: [1.0, 1.0, 1.0])
    do_convert_rgb: bool = True

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel_size**2

    @classmethod
    def from_dir(cls, path: str | Path, vision_config: dict | None = None) -> "ImageProcessor":
        """Settings from preprocessor_config.json, or processor_config.json's `image_processor`; the
        vision config's patch and pooling sizes where neither says."""
        path = Path(path)
        d = {}
        if (path / "processor_config.json").is_file():
            nested = read_json(path / "processor_config.json").get("image_processor")
            d.update(nested if isinstance(nested, dict) else {})
        if (path / "preprocessor_config.json").is_file():
            d.update(read_json(path / "preprocessor_config.json"))
        vc = vision_config or {}
        p = cls()
        kw = {f: d.get(f, vc.get(f, getattr(p, f))) for f in ("patch_size", "pooling_kernel_size")}
        for f in ("max_soft_tokens", "do_resize", "resample", "do_rescale", "rescale_factor", "do_normalize",
                  "image_mean", "image_std", "do_convert_rgb"):
            kw[f] = d.get(f, getattr(p, f))
        if kw["max_soft_tokens"] not in SOFT_TOKEN_BUDGETS:
            raise DgError(f"preprocessor_config.json: max_soft_tokens must be one of {list(SOFT_TOKEN_BUDGETS)}, "
                          f"got {kw['max_soft_tokens']!r}")
        for f in ("patch_size", "pooling_kernel_size"):
            if not isinstance(kw[f], int) or isinstance(kw[f], bool) or not 0 < kw[f] <= 1024:
                raise DgError(f"preprocessor_config.json: {f} must be a positive integer, got {kw[f]!r}")
        return cls(**kw)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The reference's `get_aspect_ratio_preserving_size`."""
        p, k = self.patch_size, self.pooling_kernel_size
        target_px = self.max_patches * p * p
        factor = math.sqrt(target_px / (height * width))
        side = k * p
        th = int(math.floor(factor * height / side)) * side
        tw = int(math.floor(factor * width / side)) * side
        if th == 0 and tw == 0:
            raise ImageError(f"a {width}x{height} image cannot be resized for this model")
        longest = (self.max_patches // k**2) * side
        if th == 0:
            th, tw = side, min(int(math.floor(width / height)) * side, longest)
        elif tw == 0:
            tw, th = side, min(int(math.floor(height / width)) * side, longest)
        if th * tw > target_px:
            raise ImageError(f"a {width}x{height} image is too elongated for this model "
                             f"(it would need more than {self.max_patches} patches)")
        return th, tw

    def __call__(self, image) -> "Pixels":
        """One RGB PIL image -> its padded patches, positions and soft-token count."""
        from PIL import Image

        rgb = to_rgb(image) if self.do_convert_rgb else image
        a = np.array(rgb)
        if a.ndim == 2:
            a = a[..., None]
        h, w = a.shape[:2]
        if self.do_resize:
            th, tw = self.target_size(h, w)
            if (th, tw) != (h, w):
                a = np.array(Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a).resize(
                    (tw, th), resample=self.resample))
                a = a[..., None] if a.ndim == 2 else a
        x = np.moveaxis(a, -1, 0)  # (C, H, W)
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            mean = np.array(self.image_mean, dtype=np.float64)[:, None, None]
            std = np.array(self.image_std, dtype=np.float64)[:, None, None]
            x = ((x - mean) / std).astype(np.float32)
        p = self.patch_size
        C, H, W = x.shape
        ph, pw = H // p, W // p
        patches = x.reshape(C, ph, p, pw, p).transpose(1, 3, 2, 4, 0).reshape(ph * pw, -1)
        gx, gy = np.meshgrid(np.arange(pw), np.arange(ph), indexing="xy")
        pos = np.stack([gx, gy], axis=-1).reshape(ph * pw, 2)
        n = patches.shape[0]
        pixels = np.zeros((self.max_patches, patches.shape[1]), dtype=patches.dtype)
        pixels[:n] = patches
        positions = np.full((self.max_patches, 2), -1, dtype=np.int64)
        positions[:n] = pos
        return Pixels(pixels, positions, n // self.pooling_kernel_size**2)


@dataclass
class Pixels:
    pixels: np.ndarray  # (max_patches, 3·p²) float32
    positions: np.ndarray  # (max_patches, 2) int64 (x, y); -1 for padding
    tokens: int  # soft tokens this image becomes


def to_rgb(image):
    """The reference's convert_to_rgb: transparency composited onto white, then RGB."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def open_image(source, name: str | None = None):
    """A PIL image from a path, raw bytes or a PIL image, decoded and checked; an ImageError (one
    line) for a missing file, something that is not an image or cannot be decoded, or one over
    MAX_PIXELS. Paths and bytes are EXIF-rotated and converted to RGB, as the reference's load_image;
    a PIL image is returned as it is."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, Image.Image):
        _check_size(source, name or "the image")
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        label, f = name or "the image data", io.BytesIO(bytes(source))
    elif isinstance(source, (str, Path)):
        label = str(source)
        if not label.strip():  # Path("") is ".", which "is not a file" with no name to say
            raise ImageError("an image path is empty")
        if not Path(source).exists():
            raise ImageError(f"image not found: {label}")
        if not Path(source).is_file():
            raise ImageError(f"{label} is not a file")
        try:
            f = open(source, "rb")
        except OSError as e:
            raise ImageError(f"cannot read {label}: {e.strerror or first_line(e)}") from None
    else:
        raise ImageError(f"an image must be a file path, bytes or a PIL image, not {type(source).__name__}")
    try:
        with f, warnings.catch_warnings():  # our own size check speaks instead of Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(f)
            _check_size(img, label)
            img.load()  # decode now: a truncated or corrupt file fails here, not in the model
            return ImageOps.exif_transpose(img).convert("RGB")
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{label} is not an image (or not a format Pillow can read)") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{label} is too large to decode (over {MAX_PIXELS:,} pixels)") from None
    except Exception as e:  # Pillow's parsers raise many types on malformed input (struct.error, IndexError...)
        raise ImageError(f"{label} cannot be decoded ({first_line(e)})") from None


def image_from_bytes(data: bytes, name: str = "the image data"):
    """Raw image bytes (an upload, a base64-decoded data: URL) -> what the API takes as an image part
    ({"type": "image", "image": <this>}); an ImageError when they are not a usable image."""
    return open_image(data, name)


def _check_size(img, label: str) -> None:
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise ImageError(f"{label} is too large: {w}x{h} = {w * h:,} pixels (the limit is {MAX_PIXELS:,})")
    if w < 1 or h < 1:
        raise ImageError(f"{label} is empty ({w}x{h} pixels)")


@dataclass
class MediaTokens:
    """The placeholder the chat template writes for an image, and what it expands to."""

    image: str  # one per soft token (and the placeholder itself)
    begin: str
    end: str

    @classmethod
    def from_dir(cls, path: str | Path, tokenizer, config: dict) -> "MediaTokens | None":
        """From tokenizer_config.json (top level or `extra_special_tokens`), else the ids in config.json."""
        path = Path(path)
        tc = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
        extra = tc.get("extra_special_tokens") if isinstance(tc.get("extra_special_tokens"), dict) else {}
        ids = {"image_token": config.get("image_token_id", 258_880), "boi_token": config.get("boi_token_id", 255_999),
               "eoi_token": config.get("eoi_token_id", 258_882)}
        found = {}
        for key, id_ in ids.items():
            t = tc.get(key) or extra.get(key)
            if isinstance(t, dict):
                t = t.get("content")
            if not isinstance(t, str) and isinstance(id_, int):
                t = tokenizer.tok.id_to_token(id_)
            if not isinstance(t, str):
                return None
            found[key] = t
        return cls(found["image_token"], found["boi_token"], found["eoi_token"])

    def expand(self, text: str, counts: list[int]) -> str:
        """Each placeholder, in order, -> begin + image·n + end (n: that image's soft tokens)."""
        it = iter(counts)
        found = len(re.findall(re.escape(self.image), text))
        if found != len(counts):
            raise ImageError(f"the prompt has {found} image placeholder(s) ({self.image}) for {len(counts)} image(s); "
                             f"do not type the placeholder in the text")
        return re.sub(re.escape(self.image), lambda m: f"{self.begin}{self.image * next(it)}{self.end}", text)


# ---- prompts with images ----

@dataclass
class EncodedPrompt:
    """Prompt token ids with the images whose placeholder spans they contain (in order)."""

    ids: list[int]
    images: list[Pixels]


def image_sources(messages) -> list:
    """The image parts' sources ({"type": "image", "image" or "path": PATH | PIL.Image | bytes}) in order."""
    out = []
    for m in messages if isinstance(messages, (list, tuple)) else []:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, (list, tuple)):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image":
                    src = part.get("image", part.get("path"))
                    if src is None:
                        raise ImageError("an image part needs an 'image' (a path or a PIL image)")
                    out.append(src)
    return out


def has_images(prompt) -> bool:
    return bool(image_sources(prompt)) if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict) \
        else False


def vision_for(tokenizer) -> tuple[ImageProcessor, MediaTokens]:
    """The image processor and placeholder tokens of the checkpoint the tokenizer came from."""
    cached = getattr(tokenizer, "_vision", None)
    if cached is None:
        path = getattr(tokenizer, "path", None)
        if path is None:
            raise ImageError("this tokenizer was not loaded from a checkpoint directory; it cannot place images")
        config = read_json(Path(path) / "config.json")
        media = MediaTokens.from_dir(path, tokenizer, config)
        if media is None:
            raise ImageError(f"{path}: the tokenizer defines no image tokens (image_token, boi_token, eoi_token)")
        cached = tokenizer._vision = (ImageProcessor.from_dir(path, config.get("vision_config")), media)
    return cached


def check_vision(model) -> None:
    if not model.has_vision:
        why = " (loaded without it: --no-vision)" if model.config.vision_config is not None else ""
        raise ImageError(f"this model has no vision tower{why}: it cannot take images")


def encode_prompt(model, tokenizer, messages: list[dict], *, system: str | None = None, think: bool = False,
                  add_generation_prompt: bool = True, pixels: list[Pixels] | None = None,
                  tools: list | None = None) -> EncodedPrompt:
    """Chat messages whose content may hold image parts -> token ids with each image's placeholder
    expanded, and the images' patches (`pixels`: already processed, in order, to skip decoding);
    `tools`: function specs for the chat template."""
    check_vision(model)
    processor, media = vision_for(tokenizer)
    if pixels is None:
        pixels = [processor(open_image(src)) for src in image_sources(messages)]
    shown = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, (list, tuple)):  # the template sees the parts, not the pixels
            content = [{"type": "image"} if isinstance(p, dict) and p.get("type") == "image" else p for p in content]
        shown.append({**m, "content": content})
    if system:
        shown = [{"role": "system", "content": system}] + shown
    text = tokenizer.apply_chat_template(shown, add_generation_prompt=add_generation_prompt, enable_thinking=think,
                                         tools=tools, image_token=media.image, boi_token=media.begin,
                                         eoi_token=media.end)
    ids = tokenizer.encode(media.expand(text, [p.tokens for p in pixels]), add_special_tokens=False)
    image_id = model.config.image_token_id
    if sum(1 for t in ids if t == image_id) != sum(p.tokens for p in pixels):
        raise ImageError(f"the tokenizer's image token {media.image!r} is not the model's image_token_id {image_id}")
    return EncodedPrompt(ids, list(pixels))


def spans(ids: list[int], image_id: int) -> list[tuple[int, int]]:
    """[start, end) of each run of image tokens: one per image, in order."""
    out, start = [], None
    for i, t in enumerate(list(ids) + [None]):
        if t == image_id and start is None:
            start = i
        elif t != image_id and start is not None:
            out.append((start, i))
            start = None
    return out


def images_between(ids: list[int], image_id: int, pixels: list[Pixels], a: int, b: int) -> list[Pixels]:
    """The images whose spans lie in ids[a:b] (a span cut by a or b is a bug in the caller)."""
    out = []
    for (s, e), p in zip(spans(ids, image_id), pixels):
        if s < b and e > a:
            if s < a or e > b:
                raise ValueError(f"image span [{s}, {e}) is cut by [{a}, {b})")
            out.append(p)
    return out
