"""Decoding images in loader workers: the JPEG region decoder (libjpeg-turbo, only the crop's rows and columns)
and the Pillow fallback."""
