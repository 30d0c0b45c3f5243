"""model.generate: ragged batches, stop tokens, lengths, log-probs, determinism, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model import FinishReason

PROMPTS = [[3, 14, 15, 92, 65, 35], [2, 71], [82, 81, 82, 84, 59, 4, 52, 35, 36]]
NEW = 10


@pytest.fixture(scope="module")
def cfg():
    from tests.conftest import tiny_config

    return tiny_config()


@pytest.fixture(scope="module")
def variables(cfg):
    return model.init(cfg, jax.random.key(0))


@pytest.fixture(scope="module")
def greedy(cfg, variables):
    return model.generate(cfg, variables, PROMPTS, max_new_tokens=NEW, temperature=0)


WIDTH = 32  # every full-sequence pass runs on one right-padded shape: causal, so harmless


@jax.jit
def _full_logits(variables, tokens_1xW):
    return model.forward(_config(), variables, tokens_1xW).logits[0]


def _config():
    from tests.conftest import tiny_config

    return tiny_config()


def _padded(seq):
    return jnp.asarray([seq + [0] * (WIDTH - len(seq))])


def _no_cache_greedy(variables, prompt, steps):
    """Greedy decoding by re-running the full forward pass on the whole sequence each step."""
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(jnp.argmax(_full_logits(variables, _padded(seq))[len(seq) - 1])))
    return seq[len(prompt) :]


def test_greedy_equals_full_recomputation(cfg, variables, greedy):
    for row, prompt in enumerate(PROMPTS):
        assert greedy.completions()[row] == _no_cache_greedy(variables, prompt, NEW)
    np.testing.assert_array_equal(greedy.finish_reason, FinishReason.LENGTH)
    np.testing.assert_array_equal(greedy.lengths, NEW)


def test_ragged_batch_equals_each_prompt_alone(cfg, variables, greedy):
    for row, prompt in enumerate(PROMPTS):
        alone = model.generate(cfg, variables, [prompt], max_new_tokens=NEW, temperature=0)
        assert alone.completions()[0] == greedy.completions()[row]
        np.testing.assert_allclose(alone.logprobs[0], greedy.logprobs[row], atol=1e-5)


def test_stop_tokens_end_rows_and_the_loop(cfg, variables, greedy):
    # Stop row 0 at its 3rd token; other rows stop only if they produce it too.
    stop = greedy.completions()[0][2]
    out = model.generate(
        cfg, variables, PROMPTS, max_new_tokens=NEW, temperature=0, stop_tokens=[stop]
    )
    for row, full in enumerate(greedy.completions()):
        got = out.completions()[row]
        if stop in full:
            cut = full.index(stop) + 1
            assert got == full[:cut] and out.finish_reason[row] == FinishReason.STOP
            assert np.all(np.asarray(out.tokens[row, cut:]) == 0)
            assert np.all(np.asarray(out.logprobs[row, cut:]) == 0)
        else:
            assert got == full and out.finish_reason[row] == FinishReason.LENGTH


def test_max_new_tokens_one(cfg, variables, greedy):
    out = model.generate(cfg, variables, PROMPTS, max_new_tokens=1, temperature=0)
    assert out.completions() == [c[:1] for c in greedy.completions()]


def test_logprobs_are_those_of_the_sampled_tokens(cfg, variables):
    """Recomputing log_softmax(logits / T) on prompt + completion gives the returned log-probs
    (the rollout log-probs GRPO compares its training forward pass against)."""
    temperature = 0.7
    out = model.generate(
        cfg, variables, PROMPTS, max_new_tokens=NEW, temperature=temperature,
        top_k=20, rng=jax.random.key(5),
    )  # fmt: skip
    for row, prompt in enumerate(PROMPTS):
        completion = out.completions()[row]
        logits = _full_logits(variables, _padded(prompt + completion))
        logits = logits[len(prompt) - 1 : len(prompt) + NEW - 1]
        logp = jax.nn.log_softmax(logits / temperature, axis=-1)
        want = jnp.take_along_axis(logp, jnp.asarray(completion)[:, None], axis=-1)[:, 0]
        np.testing.assert_allclose(out.logprobs[row], want, atol=1e-5)


def test_temperature_zero_and_top_k_one_are_greedy(cfg, variables, greedy):
    out = model.generate(
        cfg, variables, PROMPTS, max_new_tokens=NEW, top_k=1, rng=jax.random.key(9)
    )
    assert out.completions() == greedy.completions()


def test_samples_are_deterministic_per_key_and_grouped_by_prompt(cfg, variables):
    def run(seed):
        return model.generate(
            cfg, variables, PROMPTS, max_new_tokens=NEW, temperature=1.0, num_samples=4,
            rng=jax.random.key(seed),
        ).completions()  # fmt: skip

    a, b, c = run(1), run(1), run(2)
    assert a == b and a != c
    assert len(a) == len(PROMPTS) * 4
    # Samples of one prompt differ from each other (prompt-major rows: 0-3 are prompt 0).
    assert len({tuple(x) for x in a[:4]}) > 1


@pytest.mark.parametrize(
    "prompts, kwargs, message",
    [
        ([[1], []], {}, "prompt 1 is empty"),
        ([], {}, "no prompts"),
        ([[1, 500]], {}, r"token ids must lie in \[0, 97\) .*got 500"),
        ([[-3, 1]], {}, r"token ids must lie in \[0, 97\) .*got -3"),
        ([[1] * 60], {"max_new_tokens": 10}, "exceeds the model's max_seq_len 64"),
        ([[1]], {"max_new_tokens": 0}, "max_new_tokens"),
        ([[1]], {"temperature": 1.0}, "needs an rng"),
        ([[1]], {"num_samples": 0, "temperature": 0}, "num_samples"),
    ],
)
def test_bad_requests_fail_clearly(cfg, variables, prompts, kwargs, message):
    kwargs = {"max_new_tokens": 4, "temperature": 0} | kwargs
    with pytest.raises(ValueError, match=message):
        model.generate(cfg, variables, prompts, **kwargs)


def test_a_request_at_max_seq_len_fits_though_padding_takes_cache_slots(cfg, variables):
    # 50 + 14 = max_seq_len 64; padded to 64 columns the cache has 78 slots: allowed, since
    # positions start at each row's first real token.
    out = model.generate(cfg, variables, [[1] * 50], max_new_tokens=14, temperature=0)
    assert len(out.completions()[0]) == 14
