"""Arduino sketches shipped with flasher (package data: */*.ino). See README.md beside them."""
