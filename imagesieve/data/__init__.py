"""Image input: safe decoding of any file, bytes or upload, and ImageFolder reading."""

from imagesieve.data._decode import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    DecodedImage,
    ImageLoadError,
    ImageSource,
    fit_shorter_side,
    load_image,
    read_image_bytes,
    source_name,
)
from imagesieve.data._folder import (
    IMAGE_EXTENSIONS,
    ImageFolder,
    Sample,
    SkippedFile,
    scan_image_folder,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "DecodedImage",
    "ImageFolder",
    "ImageLoadError",
    "ImageSource",
    "Sample",
    "SkippedFile",
    "fit_shorter_side",
    "load_image",
    "read_image_bytes",
    "scan_image_folder",
    "source_name",
]
