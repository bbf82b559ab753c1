"""How counts read to a person: "1 round", "3 rounds", "44.3 kB"."""


def counted(count: int, noun: str) -> str:
    """``counted(1, "round")`` is "1 round", ``counted(3, "round")`` "3 rounds"."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def byte_size(count: float) -> str:
    """A byte count in the SI unit that shows it in three digits: "512 B", "3.92 kB", "44.3 kB", "1.63 MB"."""
    value, unit = float(count), "B"
    for larger in ("kB", "MB", "GB", "TB"):
        if round(value) < 1000:
            break
        value, unit = value / 1000, larger
    if unit == "B":
        return f"{value:.0f} B"
    places = 2 if value < 9.995 else 1 if value < 99.95 else 0
    return f"{value:.{places}f} {unit}"
