"""Image input: safe decoding of any file, bytes or upload, and ImageFolder reading."""

from imagesieve.data._decode import (
    MAX_MEMBER_BYTES,
    DecodedImage,
    ImageLoadError,
    ImageSource,
    fit_shorter_side,
    load_image,
    member_error,
    read_image_bytes,
    read_zip_member,
    source_name,
)
from imagesieve.data._elpv import ElpvImage, elpv_images, export_elpv
from imagesieve.data._folder import (
    IMAGE_EXTENSIONS,
    ImageFolder,
    SkippedFile,
    scan_image_folder,
    sort_into,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_MEMBER_BYTES",
    "DecodedImage",
    "ElpvImage",
    "ImageFolder",
    "ImageLoadError",
    "ImageSource",
    "SkippedFile",
    "elpv_images",
    "export_elpv",
    "fit_shorter_side",
    "load_image",
    "member_error",
    "read_image_bytes",
    "read_zip_member",
    "scan_image_folder",
    "sort_into",
    "source_name",
]
