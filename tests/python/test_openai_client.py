"""The official OpenAI Python client against a real Bulwark over HTTPS."""
import openai
import pytest

from conftest import MODEL_NAME

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_chat(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=24)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == 42
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_equals_non_streaming(client):
    full = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=24)
    stream = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=24,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len(chunks) > 3, "tokens arrive as separate events"


def test_completions(client):
    r = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text.strip()
    assert r.usage.completion_tokens <= 8
    s = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=8, temperature=0,
                                  stream=True)
    assert "".join(c.choices[0].text for c in s if c.choices) == r.choices[0].text


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=5,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for tok in content:
        assert len(tok.top_logprobs) == 3
        assert tok.top_logprobs[0].token == tok.token
        assert tok.logprob <= 0
    c = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.tokens) == 3
    assert all(len(t) == 2 for t in c.choices[0].logprobs.top_logprobs)


def test_seed_makes_sampling_repeatable(client):
    kw = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "Invent a name for a cat."}],
              temperature=1.0, top_p=0.95, max_tokens=16)
    a = client.chat.completions.create(seed=42, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=42, **kw).choices[0].message.content
    assert a == b


def test_stop(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=24, stop=["Paris"])
    assert "Paris" not in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"


def test_errors_are_openai_shaped(client, server):
    import httpx
    from openai import OpenAI
    bad = OpenAI(base_url=server.url + "/v1", api_key="bwk_wrong", max_retries=0,
                 http_client=httpx.Client(verify=server.ssl_context()))
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=100000)
    assert "limits.max_tokens" in e.value.body["message"]
