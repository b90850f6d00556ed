"""Config header templates shipped with flasher (package data: *.h.j2; names starting with _ are partials)."""
