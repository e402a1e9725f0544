"""What the chat template sees beside each conversation: the experiment's tokenizer.template_vars, and a fixed date
for Llama 3.2's template, which would otherwise write today's date into every conversation."""

from datetime import datetime

from tests.chat_fixtures import FAMILIES, FIXTURES, tokenizer, trl_tokenizer
from tunelab.config import TokenizerSettings
from tunelab.templates import TEMPLATE_DATE, encode, for_outside_renderer, reads_the_clock, template_vars

CHAT = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."}]}


def llama32():
    return tokenizer(FAMILIES["llama-3.2-instruct"], (FIXTURES / "llama-3.2-instruct.jinja").read_text())


def rendered(tok, settings: TokenizerSettings) -> str:
    encoded = encode(tok, [CHAT], ["row 1"], template_vars=template_vars(settings, tok))
    return tok.decode(encoded.examples[0].input_ids)


def test_llama32_renders_a_fixed_date_not_today() -> None:
    tok = llama32()
    today = datetime.now().strftime("%d %b %Y")
    assert today in tok.apply_chat_template(CHAT["messages"], tokenize=False)  # the template alone: the clock
    text = rendered(tok, TokenizerSettings())
    assert f"Today Date: {TEMPLATE_DATE}\n" in text and today not in text
    assert not reads_the_clock(tok, template_vars(TokenizerSettings(), tok))
    assert reads_the_clock(tok, {})


def test_template_vars_reach_the_template() -> None:
    tok = llama32()
    text = rendered(tok, TokenizerSettings(template_vars={"date_string": "01 Jan 2030"}))
    assert "Today Date: 01 Jan 2030\n" in text
    assert template_vars(TokenizerSettings(template_vars={"enable_thinking": False}), tok) == {
        "enable_thinking": False,
        "date_string": TEMPLATE_DATE,
    }


def test_a_template_that_always_reads_the_clock_is_named() -> None:
    """gpt-oss writes "Current date: <today>" whatever it is given: the token checks say so."""
    tok = trl_tokenizer("gptoss")
    assert template_vars(TokenizerSettings(), tok) == {}
    assert reads_the_clock(tok, {})
    assert not reads_the_clock(trl_tokenizer("qwen3"), {})


def test_a_renderer_that_passes_no_variables_renders_as_training_did() -> None:
    """lm-eval calls apply_chat_template with no variables: the run's are set inside the template, so Qwen3 answers
    without thinking and Llama 3.2's system turn carries the fixed date, as in training."""
    prompt = [{"role": "user", "content": "Hi there"}]
    for tok, variables in (
        (trl_tokenizer("qwen3"), {"enable_thinking": False}),
        (llama32(), template_vars(TokenizerSettings(), llama32())),
    ):
        expected = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **variables)
        assert tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) != expected
        baked = for_outside_renderer(tok, variables)
        assert baked.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == expected
    assert expected.count(TEMPLATE_DATE) == 1
