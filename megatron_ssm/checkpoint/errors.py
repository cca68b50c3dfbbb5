"""The one error every checkpoint problem raises, so CLIs can print it without a traceback."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, or does not match the model."""


def check_names(found: list[str], expected: list[str], where: str) -> None:
    """Raise CheckpointError naming the missing and the unexpected tensors, if any."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensor(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected tensor(s) {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        raise CheckpointError(f"{where}: " + "; ".join(parts))
