"""The one error type users see: a single line that names the place and the fix."""


class TunelabError(Exception):
    """Bad input or an impossible request. The CLI prints `error: <message>` and exits with code 2."""


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """A '; did you mean X?' suffix for the closest choice, or a list of the valid ones."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; valid keys: {', '.join(sorted(choices))}"


class ConfigError(TunelabError):
    """A problem with a key of the experiment file; the CLI prefixes the file's path."""


class Terminated(BaseException):
    """SIGTERM arrived (a scheduler or `kill` stopping the run). Not an Exception, so no handler swallows it."""


def disk_full(error: BaseException) -> bool:
    """Whether a failure came from a full disk or an exhausted quota: the OS's error anywhere in the exception
    chain, or a library's words for it (safetensors' writer, torch's zip writer report it as text)."""
    import errno

    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(e) for words in ("No space left on device", "Disk quota exceeded")):
            return True
        e = e.__cause__ or e.__context__
    return False
