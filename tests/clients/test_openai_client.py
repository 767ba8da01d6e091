"""The `openai` Python client (from PyPI, unmodified) against `opt-rs serve`."""
import json
import math
import subprocess

import openai
import pytest

from conftest import API_KEY, BIN, MODEL, MODEL_NAME


def client(server, key="unused"):
    # max_retries=0: a failure must show as a failure, not as a retried success.
    return openai.OpenAI(api_key=key, base_url=server.url + "/v1", max_retries=0, timeout=120)


def test_models_list(server):
    ids = [m.id for m in client(server).models.list()]
    assert ids == [MODEL_NAME]


def test_greedy_completion_shape(server):
    r = client(server).completions.create(model=MODEL_NAME, prompt="Hello, my name is", max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    assert r.model == MODEL_NAME
    assert r.id.startswith("cmpl-")
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.index == 0
    assert c.finish_reason in ("length", "stop")
    assert isinstance(c.text, str)
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # Greedy is deterministic.
    again = client(server).completions.create(model=MODEL_NAME, prompt="Hello, my name is", max_tokens=8, temperature=0)
    assert again.choices[0].text == c.text


def test_streamed_text_equals_non_streamed_text(server):
    args = dict(model=MODEL_NAME, prompt=["The meaning of life is", "Once upon a time"], max_tokens=24, temperature=0)
    whole = client(server).completions.create(**args)
    texts = ["", ""]
    finish = [None, None]
    chunks = 0
    for chunk in client(server).completions.create(stream=True, **args):
        assert chunk.object == "text_completion"
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
            chunks += 1
    assert chunks > 2, "streamed token by token"
    assert texts == [c.text for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]


def test_stream_with_usage(server):
    stream = client(server).completions.create(
        model=MODEL_NAME, prompt="Hi", max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    last = None
    for chunk in stream:
        last = chunk
    assert last.choices == []
    assert last.usage.completion_tokens >= 1


def score_cli(text, top):
    out = subprocess.run(
        [str(BIN), "score", "--model", str(MODEL), "--text", text, "--json", "--top-logprobs", str(top)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def test_echo_logprobs_equal_opt_rs_score(server):
    text = "The quick brown fox jumps over the lazy dog."
    want = score_cli(text, 3)
    # lm-evaluation-harness's request for log-likelihoods.
    r = client(server).completions.create(model=MODEL_NAME, prompt=text, max_tokens=0, echo=True, logprobs=3, temperature=0)
    c = r.choices[0]
    assert c.text == text
    lp = c.logprobs
    assert len(lp.tokens) == len(want["tokens"])
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for got, ref in zip(lp.token_logprobs[1:], want["token_logprobs"][1:]):
        assert math.isclose(got, ref, rel_tol=0, abs_tol=1e-6), (got, ref)
    for got, ref in zip(lp.top_logprobs[1:], want["top_logprobs"][1:]):
        # The score command keys alternatives by id, the API by token text: compare the values.
        ref_values = sorted(ref.values(), reverse=True)
        got_values = sorted(got.values(), reverse=True)
        assert all(math.isclose(g, w, abs_tol=1e-6) for g, w in zip(got_values[:3], ref_values)), (got, ref)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert r.usage.prompt_tokens == len(want["tokens"]) and r.usage.completion_tokens == 0

    # With a generated token too (lm-eval's older max_tokens=1 form): the prompt part still agrees.
    r = client(server).completions.create(model=MODEL_NAME, prompt=text, max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(want["tokens"]) + 1
    for got, ref in zip(lp.token_logprobs[1:-1], want["token_logprobs"][1:]):
        assert math.isclose(got, ref, abs_tol=1e-4), (got, ref)


def test_token_prompts_n_and_seed(server):
    c = client(server)
    args = dict(model=MODEL_NAME, prompt=[[2, 100, 200], [2, 300]], n=2, max_tokens=6, seed=42, temperature=0.9)
    r = c.completions.create(**args)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == 5
    assert [ch.text for ch in c.completions.create(**args).choices] == [ch.text for ch in r.choices]


def test_stop_string(server):
    c = client(server)
    free = c.completions.create(model=MODEL_NAME, prompt="A B C", max_tokens=16, temperature=0).choices[0].text
    words = free.split()
    if len(words) < 2:
        pytest.fail(f"need a few words of output to pick a stop string, got {free!r}")
    stop = words[1]
    r = c.completions.create(model=MODEL_NAME, prompt="A B C", max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == free[: free.index(stop)]
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_tokens=100000), "max_tokens"),
        (dict(n=0), "n"),
        (dict(logprobs=100), "logprobs"),
        (dict(presence_penalty=9), "presence_penalty"),
        (dict(extra_body={"top_k": "many"}), "top_k"),
    ],
)
def test_bad_requests_raise_with_the_param(server, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).completions.create(model=MODEL_NAME, prompt="x", **kwargs)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param
    assert e.value.body["message"]


def test_empty_prompt_list_and_wrong_model(server):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).completions.create(model=MODEL_NAME, prompt=[])
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.NotFoundError) as e:
        client(server).completions.create(model="gpt-3.5-turbo-instruct", prompt="x")
    assert e.value.body["param"] == "model"


def test_api_key(keyed_server):
    with pytest.raises(openai.AuthenticationError):
        client(keyed_server, key="wrong").completions.create(model=MODEL_NAME, prompt="x", max_tokens=1)
    r = client(keyed_server, key=API_KEY).completions.create(model=MODEL_NAME, prompt="x", max_tokens=1)
    assert len(r.choices) == 1
