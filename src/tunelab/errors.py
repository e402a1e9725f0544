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
