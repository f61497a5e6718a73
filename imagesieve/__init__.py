"""imagesieve: sort every image into a known class, UNKNOWN or never seen before."""

__version__ = "0.1.0"
