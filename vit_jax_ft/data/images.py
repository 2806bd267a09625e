"""Opening, validating and converting one image file for a prepared dataset.

Every file goes through `process_image` twice: once to check it (`encode=False`:
hash, full decode, conversion without encoding) and once to produce the bytes
that are stored (`encode=True`). Fine RGB JPEGs that need no resizing are
stored byte-for-byte (no quality loss, no decode on the second pass);
everything else is converted to 8-bit RGB, EXIF-rotated, optionally shrunk to
`max_side` and re-encoded. Nothing here raises for a bad file: the reason comes
back in `ImageResult.error`, so one broken file never stops a run midway.
"""

import dataclasses
import hashlib
import io
import os
from typing import Optional
import warnings

import numpy as np
from PIL import Image
from PIL import ImageOps

# Extensions of files treated as images when scanning folders (lower case).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
# Formats whose pixels already went through lossy compression: re-encoding them
# as JPEG (format 'auto') loses nothing that was not lost before.
_LOSSY_FORMATS = frozenset({"JPEG", "MPO", "WEBP"})
_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
# PIL's default Image.MAX_IMAGE_PIXELS (about 0.25 GiB as RGB). PIL itself
# refuses to open twice as many; between the two it only warns, and would
# decode them at full size.
DEFAULT_MAX_PIXELS = 89_478_485


@dataclasses.dataclass(frozen=True)
class ImageOptions:
  """How images are stored: `max_side` (None: never resize), format, JPEG quality.

  `max_pixels`: no image is decoded at more pixels than this; larger JPEGs
  are decoded at a reduced scale when `max_side` allows, others are unusable.
  """
  max_side: Optional[int] = None
  image_format: str = "auto"  # 'auto' (JPEG for lossy sources, else PNG), 'jpeg', 'png'.
  jpeg_quality: int = 95
  max_pixels: int = DEFAULT_MAX_PIXELS


@dataclasses.dataclass(frozen=True)
class ImageResult:
  """What happened to one file. `error` is set (and the rest may be empty) if unusable."""
  path: str
  sha256: str = ""
  num_bytes: int = 0
  format: str = ""
  mode: str = ""
  size: tuple[int, int] = (0, 0)         # (width, height) after EXIF rotation.
  stored_size: tuple[int, int] = (0, 0)  # (width, height) as stored.
  conversions: tuple[str, ...] = ()      # Empty: stored byte-for-byte.
  error: Optional[str] = None
  data: Optional[bytes] = None           # The bytes to store (encode=True only).


def is_image_name(path: str) -> bool:
  """Whether `path` has an image file extension."""
  return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def to_rgb(image: Image.Image) -> Image.Image:
  """Converts any PIL mode to 8-bit RGB.

  16-bit and 32-bit integer images are scaled down to 8 bits (PIL's own
  conversion clips them, turning most of a 16-bit image white); transparent
  pixels are composited onto white, because the colour stored under alpha=0 is
  arbitrary (often black) and would otherwise show up as content.
  """
  if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode in _SIXTEEN_BIT_MODES or pixels.max(initial=0) > 255:
      pixels = pixels / 257.0
    image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "L")
  has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
  if has_alpha:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return image if image.mode == "RGB" else image.convert("RGB")


def _target_size(size: tuple[int, int], max_side: Optional[int]) -> tuple[int, int]:
  width, height = size
  if not max_side or max(width, height) <= max_side:
    return size
  scale = max_side / max(width, height)
  return max(1, round(width * scale)), max(1, round(height * scale))


def _conversions(image: Image.Image, orientation: int, stored: tuple[int, int],
                 size: tuple[int, int]) -> list[str]:
  """Why an image cannot be stored as it is (empty: keep its bytes)."""
  reasons = []
  if image.format != "JPEG":
    reasons.append(f"format {image.format}")
  if image.mode != "RGB":
    reasons.append(f"mode {image.mode}")
  if "transparency" in image.info and image.mode == "RGB":
    reasons.append("transparency")
  if orientation not in (0, 1):
    reasons.append(f"exif orientation {orientation}")
  if stored != size:
    reasons.append("resized")
  if getattr(image, "n_frames", 1) > 1:
    reasons.append("first frame")
  return reasons


def _draft(image: Image.Image, orientation: int, stored: tuple[int, int]) -> None:
  """For a JPEG to be shrunk: sets it to decode at a reduced scale (`image.size` changes).

  libjpeg then decodes at the smallest scale (down to 1/8) that is still at
  least the target size: far faster and smaller for large photos, and it
  still reads all the compressed data (so truncation is still detected).
  """
  if image.format == "JPEG" and stored != image.size:
    w, h = stored if orientation in (0, 1, 2, 3, 4) else stored[::-1]
    image.draft(image.mode, (w, h))


def _pixel_limit_error(image: Image.Image, size: tuple[int, int],
                       options: ImageOptions) -> Optional[str]:
  """Why `image` (maybe drafted; `size` before that) must not be decoded, or None if it may."""
  width, height = size
  decoded = image.size[0] * image.size[1]
  if decoded <= options.max_pixels:
    return None
  if image.format != "JPEG":
    hint = (f"{image.format or 'this format'} cannot be decoded at a reduced scale; "
            "raise --max_pixels if memory allows")
  elif decoded == width * height:
    hint = "pass --max_side (e.g. 1024) to decode it at a reduced scale, or raise --max_pixels"
  else:
    hint = (f"even at the reduced scale --max_side allows it has {decoded} pixels; lower "
            "--max_side or raise --max_pixels")
  return (f"too many pixels: {width}x{height} = {width * height} > "
          f"--max_pixels={options.max_pixels}; {hint}")


def _decode(image: Image.Image, orientation: int, stored: tuple[int, int]) -> Image.Image:
  """Fully decodes (which is what detects truncation), rotates, converts, resizes."""
  image.load()
  if orientation not in (0, 1):
    image = ImageOps.exif_transpose(image)
  image = to_rgb(image)
  if image.size != stored:
    image = image.resize(stored, Image.Resampling.LANCZOS, reducing_gap=3.0)
  return image


def _encode(image: Image.Image, source_format: str, options: ImageOptions) -> bytes:
  fmt = options.image_format
  if fmt == "auto":
    fmt = "jpeg" if source_format in _LOSSY_FORMATS else "png"
  buf = io.BytesIO()
  if fmt == "jpeg":
    image.save(buf, format="JPEG", quality=options.jpeg_quality)
  else:
    image.save(buf, format="PNG", compress_level=6)
  return buf.getvalue()


def _inspect(path: str, data: bytes, options: ImageOptions, encode: bool) -> ImageResult:
  digest = hashlib.sha256(data).hexdigest()
  base = dict(path=path, sha256=digest, num_bytes=len(data))
  if not data:
    return ImageResult(**base, error="empty file (0 bytes)")
  try:
    with warnings.catch_warnings():
      # PIL warns above its own limit; options.max_pixels is checked below instead.
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      image = Image.open(io.BytesIO(data))
  except Image.UnidentifiedImageError:
    return ImageResult(**base, error="not an image (no known image format)")
  # Checked before getexif(), which decodes a whole PNG to look for EXIF at its end.
  too_large = image.format != "JPEG" and _pixel_limit_error(image, image.size, options)
  if too_large:
    return ImageResult(**base, error=too_large)
  orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1) or 1)
  size = image.size[::-1] if orientation in (5, 6, 7, 8) else image.size
  stored = _target_size(size, options.max_side)
  conversions = _conversions(image, orientation, stored, size)
  base.update(format=image.format or "", mode=image.mode, size=size, stored_size=stored,
              conversions=tuple(conversions))
  original = image.size  # As the file holds it; drafting changes image.size.
  _draft(image, orientation, stored)
  too_large = _pixel_limit_error(image, original, options)
  if too_large:
    return ImageResult(**base, error=too_large)
  if not conversions and encode:
    return ImageResult(**base, data=data)  # Checked on the first pass: keep the bytes.
  converted = _decode(image, orientation, stored)
  if not conversions:
    return ImageResult(**base)
  return ImageResult(**base, data=_encode(converted, image.format, options) if encode else None)


def process_image(path: str, options: ImageOptions, encode: bool = False) -> ImageResult:
  """Reads, hashes, validates and (if `encode`) produces the bytes to store for `path`.

  Never raises for a bad file: corrupt, truncated, empty or non-image files
  come back with `error` set to a short reason.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    return ImageResult(path=path, error=f"cannot read file ({e.strerror or e})")
  try:
    return _inspect(path, data, options, encode)
  except Image.DecompressionBombError as e:
    return ImageResult(path=path, sha256=hashlib.sha256(data).hexdigest(), num_bytes=len(data),
                       error=f"too many pixels ({e})")
  except Exception as e:  # pylint: disable=broad-except
    # Decoders raise many types (OSError, SyntaxError, ValueError, struct.error...)
    # for corrupt data; any of them means: skip this file, with the reason.
    message = str(e) or type(e).__name__
    if "truncated" in message:
      message = f"truncated image ({message})"
    else:
      message = f"corrupt or unsupported image ({type(e).__name__}: {message})"
    return ImageResult(path=path, sha256=hashlib.sha256(data).hexdigest(), num_bytes=len(data),
                       error=message)

