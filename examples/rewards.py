"""Reward functions for examples/grpo.yaml, called as TRL's GRPOTrainer calls them.

Each gets the sampled completions (for chat prompts, a list of messages each: the reply is [0]["content"]) and the
data row's other fields as keyword arguments, one value per completion, and returns one float per completion (or
None where it does not apply).
"""


def _replies(completions: list) -> list[str]:
    return [c[0]["content"] if isinstance(c, list) else c for c in completions]


def names_country(completions: list, country: list[str], **kwargs) -> list[float]:
    """1 where the reply talks about the country asked about: relevance."""
    return [1.0 if name in reply else 0.0 for reply, name in zip(_replies(completions), country, strict=True)]


def names_capital(completions: list, capital: list[str], **kwargs) -> list[float]:
    """1 where the reply names the right capital: correctness, checked against the row's answer."""
    return [1.0 if name in reply else 0.0 for reply, name in zip(_replies(completions), capital, strict=True)]
