"""Drives serrano with the official openai SDK, exactly as an application would."""
import sys

from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key=sys.argv[2])
model = client.models.list().data[0].id
passed = 0

r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Name a primary colour."}], max_tokens=16, temperature=0)
assert r.choices[0].message.role == "assistant" and r.choices[0].message.content, r
assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 16, r.usage
print("chat:", repr(r.choices[0].message.content))
passed += 1

chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Count to five."}], max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True}))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
usage = chunks[-1].usage
assert text and usage is not None and usage.completion_tokens > 0 and chunks[-1].choices == [], chunks[-1]
assert all(c.usage is None for c in chunks[:-1])
print("stream:", repr(text), usage)
passed += 1

r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
assert r.choices[0].text and r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length", r
print("completion:", repr(r.choices[0].text))
passed += 1

print(f"{passed} passed, 0 failed")
