"""Every code example of the seed documentation (shared/seed-docs), run with neoxja in place of transformers.

EXAMPLES holds each example exactly as its document prints it; `adapt` makes the only changes allowed: `transformers`
becomes `neoxja` and hub ids become tiny local checkpoints. test_examples_are_verbatim checks the text against the documents. Sampled or random-weight outputs
cannot match the documents' outputs, so those tests check the shape of what the example produces; deterministic ones
(the tokenizer's) must match exactly."""
from __future__ import annotations

import ast
import contextlib
import doctest
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import neoxja.modeling  # noqa: F401  (imported before test_config's meta-device context: its tensors stay real)

from abeja_fixtures import abeja_checkpoint, rinna_model_checkpoint  # noqa: F401  (fixtures)

PROMPT = "人とAIが協調するためには、"
EN = "gpt_neox_japanese.en.md"
API = "gpt_neox_japanese.api-reference.md"  # its Japanese is mis-encoded: these are the same strings, decoded
RINNA = "rinna-japanese-gpt-neox-3.6b.model-card.md"

EXAMPLES: dict[str, tuple[str, str]] = {
    "pipeline": (EN, '''\
import torch
from transformers import pipeline
pipeline = pipeline(task="text-generation",
                    model="abeja/gpt-neox-japanese-2.7b", torch_dtype=torch.float16, device=0)
pipeline("人とAIが協調するためには、")
'''),
    "automodel": (EN, '''\
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("abeja/gpt-neox-japanese-2.7b", torch_dtype=torch.float16, device_map="auto")
tokenizer = AutoTokenizer.from_pretrained("abeja/gpt-neox-japanese-2.7b")
input_ids = tokenizer("人とAIが協調するためには、", return_tensors="pt").input_ids.to(model.device)
outputs = model.generate(input_ids)
print(tokenizer.decode(outputs[0], skip_special_tokens=True))
'''),
    "cli": (EN, '''\
echo -e "人とAIが協調するためには、" | transformers run --task text-generation --model abeja/gpt-neox-japanese-2.7b --device 0
'''),
    "quantization": (EN, '''\
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

quantization_config = BitsAndBytesConfig(
    load_in_4bit=True,
    bnb_4bit_use_double_quant=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_compute_dtype="float16"
)
model = AutoModelForCausalLM.from_pretrained(
    "abeja/gpt-neox-japanese-2.7b",
    quantization_config=quantization_config,
    device_map="auto"
)

tokenizer = AutoTokenizer.from_pretrained("abeja/gpt-neox-japanese-2.7b")
input_ids = tokenizer.encode("人とAIが協調するためには、", return_tensors="pt").to(model.device)
output = model.generate(input_ids)
print(tokenizer.decode(output[0], skip_special_tokens=True))
'''),
    "visualizer": (EN, '''\
from transformers.utils.attention_visualizer import AttentionMaskVisualizer

visualizer = AttentionMaskVisualizer("abeja/gpt-neox-japanese-2.7b")
visualizer("<img>What is shown in this image?")
'''),
    "sampling": ("gpt_neox_japanese.ko.md", '''\
>>> from transformers import GPTNeoXJapaneseForCausalLM, GPTNeoXJapaneseTokenizer

>>> model = GPTNeoXJapaneseForCausalLM.from_pretrained("abeja/gpt-neox-japanese-2.7b")
>>> tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained("abeja/gpt-neox-japanese-2.7b")

>>> prompt = "人とAIが協調するためには、"

>>> input_ids = tokenizer(prompt, return_tensors="pt").input_ids

>>> gen_tokens = model.generate(
...     input_ids,
...     do_sample=True,
...     temperature=0.9,
...     max_length=100,
... )
>>> gen_text = tokenizer.batch_decode(gen_tokens, skip_special_tokens=True)[0]

>>> print(gen_text)
人とAIが協調するためには、AIと人が共存し、AIを正しく理解する必要があります。
'''),
    "config": (API, '''\
>>> from transformers import GPTNeoXJapaneseConfig, GPTNeoXJapaneseModel

>>> # Initializing a GPTNeoXJapanese gpt-neox-japanese-2.7b style configuration
>>> configuration = GPTNeoXJapaneseConfig()

>>> # Initializing a model (with random weights) from the gpt-neox-japanese-2.7b style configuration
>>> model = GPTNeoXJapaneseModel(configuration)

>>> # Accessing the model configuration
>>> configuration = model.config
'''),
    "tokenizer": (API, '''\
>>> from transformers import GPTNeoXJapaneseTokenizer

>>> tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained("abeja/gpt-neox-japanese-2.7b")
>>> # You can confirm both 慶応 and 慶應 are encoded to 17749
>>> tokenizer("吾輩は猫である🐯。実は慶応(慶應)大学出身")["input_ids"]
[30014, 26883, 26638, 27228, 25, 26650, 31732, 31679, 27809, 26638, 17749, 31592, 17749, 31593, 321, 1281]

>>> # Both 慶応 and 慶應 are decoded to 慶応
>>> tokenizer.decode(tokenizer("吾輩は猫である🐯。実は慶応(慶應)大学出身")["input_ids"])
'吾輩は猫である🐯。実は慶応(慶応)大学出身'
'''),
    "base_model": (API, '''\
>>> from transformers import AutoTokenizer, GPTNeoXJapaneseModel
>>> import torch

>>> tokenizer = AutoTokenizer.from_pretrained("abeja/gpt-neox-japanese-2.7b")
>>> model = GPTNeoXJapaneseModel.from_pretrained("abeja/gpt-neox-japanese-2.7b")

>>> inputs = tokenizer("日本語のGPT-neoxがHugging Faceで使えます😀", return_tensors="pt")
>>> outputs = model(**inputs)

>>> last_hidden_states = outputs.last_hidden_state
'''),
    "causal_lm": (API, '''\
>>> from transformers import AutoTokenizer, GPTNeoXJapaneseForCausalLM, GPTNeoXJapaneseConfig
>>> import torch

>>> tokenizer = AutoTokenizer.from_pretrained("abeja/gpt-neox-japanese-2.7b")
>>> config = GPTNeoXJapaneseConfig.from_pretrained("abeja/gpt-neox-japanese-2.7b")
>>> config.is_decoder = True
>>> model = GPTNeoXJapaneseForCausalLM.from_pretrained("abeja/gpt-neox-japanese-2.7b", config=config)

>>> inputs = tokenizer("日本語のGPT-neoxがHugging Faceで使えます😀", return_tensors="pt")
>>> outputs = model(**inputs)

>>> prediction_logits = outputs.logits
'''),
    "rinna": (RINNA, '''\
import torch
from transformers import AutoTokenizer, AutoModelForCausalLM

tokenizer = AutoTokenizer.from_pretrained("rinna/japanese-gpt-neox-3.6b", use_fast=False)
model = AutoModelForCausalLM.from_pretrained("rinna/japanese-gpt-neox-3.6b")

if torch.cuda.is_available():
    model = model.to("cuda")

text = "西田幾多郎は、"
token_ids = tokenizer.encode(text, add_special_tokens=False, return_tensors="pt")

with torch.no_grad():
    output_ids = model.generate(
        token_ids.to(model.device),
        max_new_tokens=100,
        min_new_tokens=100,
        do_sample=True,
        temperature=0.8,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id
    )

output = tokenizer.decode(output_ids.tolist()[0])
print(output)
"""西田幾多郎は、この「絶対矛盾的自己同一」を「世界の自己同一」と置きかえ、さらに西田哲学を出発点として「絶対無」を「世界の成立」に変え、世界と自己を一つの統一物とみなす哲学として展開する。この世界と自己は絶対矛盾的自己同一として同一の性質を有し、同じ働きをする。西田哲学においては、この世界と自己は矛盾しあうのではなく、同一の性質をもっている。この世界と自己は同一である。絶対"""
'''),
    "rinna_no_dummy_prefix": (RINNA, '''\
print(tokenizer.tokenize("吾輩は猫である"))
# ['吾', '輩', 'は', '猫', 'である']
# instead of ['▁', '吾', '輩', 'は', '猫', 'である'] as in rinna/japanese-gpt-1b
'''),
    "rinna_whitespace": (RINNA, '''\
print(tokenizer.tokenize("  吾輩は  猫である   "))
# ['▁', '▁', '吾', '輩', 'は', '▁', '▁', '猫', 'である', '▁', '▁', '▁']
# instead of ['▁', '吾', '輩', 'は', '▁猫', 'である'] as in rinna/japanese-gpt-1b
'''),
    "rinna_use_fast": (RINNA, '''\
good_tokenizer = AutoTokenizer.from_pretrained("rinna/japanese-gpt-neox-3.6b", use_fast=False)
bad_tokenizer = AutoTokenizer.from_pretrained("rinna/japanese-gpt-neox-3.6b")

print(good_tokenizer.decode(good_tokenizer.encode("გამარჯობა  吾輩は  猫である   ")))
# 'გამარჯობა  吾輩は  猫である   </s>'
print(bad_tokenizer.decode(bad_tokenizer.encode("გამარჯობა  吾輩は  猫である   ")))
# 'გამარ[UNK]ობა 吾輩は 猫である </s>'
'''),
}


def adapt(name: str, checkpoints: dict[str, Path]) -> str:
    """The example with transformers → neoxja and hub ids → local checkpoints; nothing else changes."""
    code = re.sub(r"\btransformers\b", "neoxja", EXAMPLES[name][1])
    for hub_id, path in checkpoints.items():
        code = code.replace(hub_id, str(path))
    return code


def run_script(code: str, namespace: dict | None = None) -> tuple[dict, Any, str]:
    """Run a script example: its globals, the value of its last line when that is an expression (as a notebook
    shows it), and what it printed."""
    tree = ast.parse(code)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    namespace = {} if namespace is None else namespace
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(tree, "<doc example>", "exec"), namespace)
        value = eval(compile(ast.Expression(last.value), "<doc example>", "eval"), namespace) if last else None
    return namespace, value, printed.getvalue()


def run_session(code: str) -> tuple[dict, list[tuple[str, str]]]:
    """Run a >>> session as doctest does: its globals and (expected, actual) output of each statement."""
    namespace: dict = {}
    outputs = []
    for example in doctest.DocTestParser().get_examples(code):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(example.source, "<doc example>", "single"), namespace)
        outputs.append((example.want.strip(), printed.getvalue().strip()))
    return namespace, outputs


@pytest.fixture
def abeja(abeja_checkpoint):  # noqa: F811
    return {"abeja/gpt-neox-japanese-2.7b": abeja_checkpoint}


@pytest.fixture
def rinna(rinna_model_checkpoint):  # noqa: F811
    return {"rinna/japanese-gpt-neox-3.6b": rinna_model_checkpoint}


# ---------------------------------------------------------------------------------------------------------------
def _seed_docs() -> Path:
    repo = Path(__file__).resolve().parent.parent
    for candidate in (repo / "shared" / "seed-docs", repo.parent / "shared" / "seed-docs"):
        if candidate.is_dir():
            return candidate
    pytest.fail("shared/seed-docs not found beside the repository: cannot compare the examples with the documents")


def _unmangle(line: str) -> str:
    """The API reference's text is UTF-8 that was read as Mac Roman and saved again; undo that where it applies."""
    try:
        return line.encode("mac_roman").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return line


def _lines(text: str) -> str:
    # Indentation (the model card indents examples inside list items) and trailing spaces do not count.
    return "\n".join(_unmangle(line).strip() for line in text.splitlines())


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_are_verbatim(name):
    document, code = EXAMPLES[name]
    assert _lines(code.strip()) in _lines((_seed_docs() / document).read_text(encoding="utf-8"))


def test_translations_show_the_same_sampling_example():
    code = _lines(EXAMPLES["sampling"][1].strip())
    assert code in _lines((_seed_docs() / "gpt_neox_japanese.zh.md").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:generation stops at the context window")  # 256 new tokens > tiny context
def test_pipeline(abeja):
    # device=0 where there is no GPU: the CPU, with a warning
    fallback = contextlib.nullcontext() if torch.cuda.is_available() else pytest.warns(UserWarning, match="no CUDA")
    with fallback:
        namespace, result, _ = run_script(adapt("pipeline", abeja))
    assert namespace["pipeline"].model.dtype == torch.float16
    assert len(result) == 1 and result[0]["generated_text"].startswith(PROMPT)


def test_automodel(abeja):
    namespace, _, printed = run_script(adapt("automodel", abeja))
    assert namespace["model"].dtype == torch.float16
    assert namespace["outputs"].shape[1] == namespace["input_ids"].shape[1] + 20  # the default: 20 new tokens
    assert printed.startswith(PROMPT)


def test_cli(abeja):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1",  # one thread: faster for a tiny model
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # this neoxja
    done = subprocess.run(["bash", "-c", adapt("cli", abeja)], capture_output=True, text=True, env=env,
                          encoding="utf-8", timeout=120)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    # echo's newline is part of the prompt, as in the reference's `run`
    assert len(results) == 1 and results[0]["generated_text"].startswith(PROMPT + "\n")
    assert torch.cuda.is_available() or "no CUDA GPU" in done.stderr


def test_quantization(abeja):
    _, _, printed = run_script(adapt("quantization", abeja))
    assert printed.startswith(PROMPT)


def test_attention_mask_visualizer(abeja):
    _, value, printed = run_script(adapt("visualizer", abeja))
    assert value is None  # the grid is printed, as by the reference
    rows = [line for line in printed.splitlines() if re.match(r"'.*' *: +\d+ ", line)]
    assert len(rows) == 33  # "<img>What is shown in this image?": < i m g > W h a t <SP> i s ... ?, 33 tokens
    assert rows[0].startswith("'<'") and rows[9].startswith("'<SP>'") and rows[-1].startswith("'?'")


def test_sampling(abeja):
    namespace, outputs = run_session(adapt("sampling", abeja))
    assert namespace["gen_tokens"].shape[1] <= 100
    (_, printed), = [o for o in outputs if o[0]]  # the one statement that prints: sampled, so not the doc's text
    assert printed.startswith(PROMPT) and len(printed) > len(PROMPT)


def test_config():
    with torch.device("meta"):  # the example builds the full 2.7B model with random weights; keep it shapes-only
        namespace, _ = run_session(adapt("config", {}))
    config = namespace["configuration"]
    assert type(config).__name__ == "GPTNeoXJapaneseConfig" and config.hidden_size == 2560
    assert namespace["model"].num_parameters() > 2.5e9


def test_tokenizer(abeja):
    _, outputs = run_session(adapt("tokenizer", abeja))
    for expected, actual in outputs:
        assert actual == expected


def test_base_model(abeja):
    namespace, _ = run_session(adapt("base_model", abeja))
    ids = namespace["inputs"]["input_ids"]
    assert namespace["last_hidden_states"].shape == (1, ids.shape[1], 32)


def test_causal_lm(abeja):
    namespace, _ = run_session(adapt("causal_lm", abeja))
    ids = namespace["inputs"]["input_ids"]
    assert namespace["prediction_logits"].shape == (1, ids.shape[1], 32000)


def test_rinna_card(rinna):
    namespace, _, printed = run_script(adapt("rinna", rinna))
    assert namespace["output_ids"].shape[1] == namespace["token_ids"].shape[1] + 100  # min = max = 100 new
    assert printed.startswith("西田幾多郎は、")
    _, _, printed = run_script(adapt("rinna_no_dummy_prefix", rinna), namespace)
    assert printed == "['吾', '輩', 'は', '猫', 'である']\n"
    _, _, printed = run_script(adapt("rinna_whitespace", rinna), namespace)
    assert printed == "['▁', '▁', '吾', '輩', 'は', '▁', '▁', '猫', 'である', '▁', '▁', '▁']\n"
    _, _, printed = run_script(adapt("rinna_use_fast", rinna), namespace)
    # neoxja has one, correct, tokenizer: use_fast changes nothing, so the card's "bad" output does not happen.
    assert printed == "გამარჯობა  吾輩は  猫である   </s>\n" * 2
