"""Tool calling and structured outputs through the official openai SDK against the real default
model: every answer must be a valid call or valid JSON, not merely most of them."""
import json
import sys

import jsonschema
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key=sys.argv[2])
passed = failed = 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
    else:
        failed += 1
        print(f"FAIL {name}: {detail}")


WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city.", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Get the local time in a city.", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Perth", "Rome", "Seoul",
          "Accra", "Dakar", "Hanoi", "Lagos", "Minsk", "Sofia", "Tunis", "Vaduz", "Zagreb", "Bern"]

# 20 of 20 required tool calls validate against their tool's schema.
for i, city in enumerate(CITIES):
    ask = "What is the weather in" if i % 2 == 0 else "What time is it in"
    r = client.chat.completions.create(
        model="", messages=[{"role": "user", "content": f"{ask} {city}?"}],
        tools=TOOLS, tool_choice="required", max_tokens=64, temperature=0)
    c = r.choices[0]
    try:
        call = c.message.tool_calls[0]
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        check(f"required call {i}", c.finish_reason == "tool_calls" and call.type == "function"
              and call.id.startswith("call_"), str(c))
    except Exception as e:  # noqa: BLE001 - any failure is the test's
        check(f"required call {i}", False, f"{e}: {c}")

# A named tool is the one called.
r = client.chat.completions.create(
    model="", messages=[{"role": "user", "content": "Oslo, please."}], tools=TOOLS,
    tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=64, temperature=0)
check("named tool", r.choices[0].message.tool_calls[0].function.name == "get_time", str(r))

# 20 of 20 json_schema answers validate.
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
for i, city in enumerate(CITIES):
    r = client.chat.completions.create(
        model="", messages=[{"role": "user", "content": f"Invent a person who lives in {city}."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}},
        max_tokens=96, temperature=0)
    text = r.choices[0].message.content
    try:
        jsonschema.validate(json.loads(text), PERSON)
        check(f"json_schema {i}", r.choices[0].finish_reason == "stop", text)
    except Exception as e:  # noqa: BLE001
        check(f"json_schema {i}", False, f"{e}: {text!r}")

# Streamed tool-call deltas reassemble to the same call as the whole answer.
whole = client.chat.completions.create(
    model="", messages=[{"role": "user", "content": "What is the weather in Rome?"}],
    tools=TOOLS, tool_choice="required", max_tokens=64, temperature=0).choices[0].message.tool_calls[0]
name, args, finish, fragments, ids = "", "", None, 0, []
for chunk in client.chat.completions.create(
        model="", messages=[{"role": "user", "content": "What is the weather in Rome?"}],
        tools=TOOLS, tool_choice="required", max_tokens=64, temperature=0, stream=True):
    for ch in chunk.choices:
        for d in ch.delta.tool_calls or []:
            name += d.function.name or ""
            args += d.function.arguments or ""
            fragments += bool(d.function.arguments)
            ids += [d.id] if d.id else []
        finish = ch.finish_reason or finish
check("streamed call", (name, args, finish) ==
      (whole.function.name, whole.function.arguments, "tool_calls"), f"{name} {args} {finish}")
# As OpenAI streams calls: the name (with the id) first, then the arguments in pieces.
check("streamed argument fragments", fragments > 2 and len(ids) == 1, f"{fragments} {ids}")

# tool_choice none answers in words.
r = client.chat.completions.create(
    model="", messages=[{"role": "user", "content": "Say hello."}], tools=TOOLS,
    tool_choice="none", max_tokens=16, temperature=0)
check("none", r.choices[0].message.tool_calls is None and r.choices[0].message.content, str(r))

# A conversation with the call and its result continues in words.
r = client.chat.completions.create(
    model="", messages=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ], tools=TOOLS, tool_choice="none", max_tokens=32, temperature=0)
check("tool result", bool(r.choices[0].message.content), str(r))

print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
