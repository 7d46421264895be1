"""Text tokenizer for Qwen3-Omni: load a checkpoint's tokenizer, encode/decode, stream-decode, and build a tiny
byte-level BPE tokenizer of our own for tests (nothing is ever fetched from a model hub).

The real checkpoint's text pipeline, as transformers 5.23 rebuilds it in `Qwen2Tokenizer.__init__` whatever
`tokenizer.json` says (MODEL_SPEC §16 sources; `models/qwen2/tokenization_qwen2.py`):
  NFC normalizer → regex split (`QWEN_PRETOKENIZE_REGEX`, "isolated") → ByteLevel(add_prefix_space=False,
  use_regex=False) → BPE(unk_token=None, no byte fallback) → ByteLevel decoder.
Special tokens are added tokens matched verbatim in the text before pre-tokenization. `system`, `user` and
`assistant` are NOT special: they are ordinary BPE words (ids 8948 / 872 / 77091 in the real vocab), which is why
`<|im_start|>user\\n` encodes to three ids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Ids of the released Qwen3-Omni-30B-A3B vocabulary. The ones the model reads are in MODEL_SPEC §2 (config.json);
# the tts/audio block order 151669..151675 was cross-checked against third-party copies of the added-token table.
QWEN3_OMNI_TOKEN_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<|audio_start|>": 151669,
    "<|audio_end|>": 151670,
    "<tts_pad>": 151671,
    "<tts_text_bos>": 151672,
    "<tts_text_eod>": 151673,
    "<tts_text_bos_single>": 151674,
    "<|audio_pad|>": 151675,
    "system": 8948,  # plain BPE words, not added tokens
    "user": 872,
    "assistant": 77091,
}
PLAIN_WORD_TOKENS = ("system", "user", "assistant")

# Attribute names the transformers processor reads off the tokenizer (`tokenizer.audio_token`, ...).
PROCESSOR_TOKEN_ATTRIBUTES = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "audio_token": "<|audio_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level map: printable Latin-1 bytes map to themselves, the other 68 bytes to U+0100 onward."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _set_qwen_pipeline(backend: tokenizers.Tokenizer) -> None:
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)


def _qwen_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> models.BPE:
    return models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                      end_of_word_suffix="", fuse_unk=False, byte_fallback=False)


class Tokenizer:
    """A `tokenizers.Tokenizer` with the few calls the runtime needs.

    `vocab_size` counts tokenizer ids (151,676 for the real checkpoint), which is smaller than the model's
    embedding rows (152,064): ids in between exist only as logits and decode to nothing.
    """

    def __init__(self, backend: tokenizers.Tokenizer, chat_template: str | None = None):
        self.backend = backend
        self.special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        self.chat_template = chat_template  # the checkpoint's Jinja chat template; None: the built-in one

    @classmethod
    def from_dir(cls, checkpoint_dir: str | os.PathLike) -> "Tokenizer":
        """Load `tokenizer.json`, or else build the byte-level BPE from `vocab.json` + `merges.txt` with the added
        tokens listed in `tokenizer_config.json` (`added_tokens_decoder`)."""
        from runtime.frontend.conversation import load_chat_template  # conversation -> prompt -> tokenizer

        root = Path(checkpoint_dir)
        if (root / "tokenizer.json").is_file():
            path = root / "tokenizer.json"
            try:
                backend = tokenizers.Tokenizer.from_file(str(path))
            except Exception as exc:  # the Rust loader raises a bare Exception for bad JSON or a bad model
                raise ValueError(f"tokenizer file {path} is damaged or not a tokenizers JSON file: {exc}") from exc
            return cls(backend, load_chat_template(root))
        if (root / "vocab.json").is_file() and (root / "merges.txt").is_file():
            try:
                backend = _backend_from_vocab_merges(root)
            except (ValueError, KeyError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"tokenizer files vocab.json / merges.txt in {root} are damaged: {exc}") from exc
            return cls(backend, load_chat_template(root))
        raise FileNotFoundError(
            f"no tokenizer in {root}: looked for tokenizer.json, or vocab.json together with merges.txt "
            f"(found: {sorted(p.name for p in root.iterdir()) if root.is_dir() else 'directory missing'})")

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special tokens written in the text (`<|im_start|>`, `<|audio_pad|>`, ...) map to their id."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        """Id of one vocabulary entry; KeyError if the vocabulary has no such token."""
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return token_id

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)


def _backend_from_vocab_merges(root: Path) -> tokenizers.Tokenizer:
    vocab = json.loads((root / "vocab.json").read_text(encoding="utf-8"))
    merges = []
    for line in (root / "merges.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith("#version") or not line.strip():
            continue
        left, right = line.split(" ")
        merges.append((left, right))
    added: list[tuple[int, dict]] = []
    config_path = root / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        added = sorted((int(i), entry) for i, entry in config.get("added_tokens_decoder", {}).items())
    # Put added tokens into the model vocab at their declared ids, so the ids hold even when they are not
    # contiguous after vocab.json (tokenizers would otherwise number them sequentially).
    for token_id, entry in added:
        vocab.setdefault(entry["content"], token_id)
    backend = tokenizers.Tokenizer(_qwen_bpe(vocab, merges))
    _set_qwen_pipeline(backend)
    backend.add_tokens([
        AddedToken(entry["content"], special=entry.get("special", True), normalized=entry.get("normalized", False),
                   lstrip=entry.get("lstrip", False), rstrip=entry.get("rstrip", False),
                   single_word=entry.get("single_word", False))
        for _, entry in added])
    for token_id, entry in added:
        if backend.token_to_id(entry["content"]) != token_id:
            raise ValueError(f"{config_path}: added token {entry['content']!r} declared at id {token_id} but "
                             f"vocab.json gives {backend.token_to_id(entry['content'])}")
    return backend


class StreamingDecoder:
    """Incremental detokenizer: `push(id)` returns only text that is complete now.

    Byte-level tokens can end inside a multi-byte UTF-8 character; such a tail decodes to U+FFFD, so it is held
    back until a later token completes it. Each push decodes only the window since the last emitted boundary
    (`prefix_offset`), and a boundary is only taken where the decoded text ended cleanly, so the concatenation of
    everything returned (plus `flush()`) equals `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the decode window (a clean boundary)
        self.read_offset = 0  # ids before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (a truncated character decodes to U+FFFD, as in a full decode)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]


# ---------------------------------------------------------------------------------------------------------------
# Tiny tokenizer of our own, for tests and tiny checkpoints.

# Written for this project; plain ASCII so a restricted byte alphabet (tiny vocabularies) still covers it.
TINY_CORPUS = """\
The system was built to listen, to look and to answer. A user speaks into the microphone, the assistant hears
the sound, and a few hundred milliseconds later a voice comes back from the speaker. Between those two moments
there is a lot of quiet work: audio is cut into frames, frames are turned into features, and the features are
read by a large model that writes its answer one token at a time.

Every answer starts with a prompt. The prompt is a small conversation written in a simple format: each turn
opens with a marker, names its role, and closes with another marker. The system turn says who the assistant is.
The user turn holds the question, and sometimes a picture, a video or a recording. The assistant turn is where
the model writes. When the model is finished, it writes the closing marker and stops.

Pictures and recordings do not fit into text directly, so the prompt holds placeholders instead. Each
placeholder is later repeated as many times as the encoder has outputs for that picture or that sound. A short
clip of one second gives thirteen audio tokens; a photo of four hundred by six hundred pixels gives a few hundred
image tokens. The language model never sees the pixels or the samples themselves, only the vectors that the
encoders wrote into those positions.

Speed matters because people notice waiting. If the first word of an answer takes longer than a second, the
conversation feels slow, and if the voice stops in the middle of a sentence, it feels broken. So the runtime
streams: text is shown while it is written, and sound is played while it is made. The hard part is to keep the
stream smooth when several users talk to the same machine at once.

Numbers appear everywhere in this work. There are 48 layers in the thinker, 128 experts in each layer, and 8 of
them are chosen for every token. The talker has 20 layers and picks 6 experts. Audio runs at 16000 samples per
second going in and 24000 samples per second coming out. A codec frame lasts 80 milliseconds, which is 12.5
frames per second, and each frame carries 16 codes.

Good engineering here is mostly careful checking. We compare every module with a reference written by someone
else, on the same weights, and we look at the largest difference rather than the average one. We test the odd
sizes as well as the round ones: a sequence of one token, a batch that is empty, a length just past a block. When
a test fails, the message should say what was expected, what was found, and where to look next.

Language is messy, and a tokenizer has to accept all of it: names and places, questions and commands, lists,
quotes, dates like 2025-09-22, prices like $3.50, code such as print("hello, world") and the occasional typo.
It should never lose a character. Whatever it splits apart, it must be able to put back together exactly, so
that the text a user reads is the text the model meant to write.

At the end of the day the goal is simple to state. Someone asks a question, with their voice or with a photo, and
the assistant answers quickly, clearly and in a natural voice. Everything else, from the kernels to the caches to
the schedulers, exists to make that moment feel effortless for the person on the other side.
"""


def _plain_ascii_alphabet(byte_map: dict[int, str]) -> list[str]:
    return [byte_map[b] for b in [9, 10, 13, *range(32, 127)]]


def _train_merges(alphabet: list[str], budget: int) -> list[tuple[str, str]]:
    """BPE merges learned on TINY_CORPUS (rank order) with the Qwen pre-tokenizer, at most `budget` tokens."""
    backend = tokenizers.Tokenizer(models.BPE())
    _set_qwen_pipeline(backend)
    trainer = trainers.BpeTrainer(vocab_size=budget, min_frequency=2, show_progress=False,
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet))
    backend.train_from_iterator(TINY_CORPUS.splitlines(keepends=True), trainer)
    merges = json.loads(backend.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE on one pre-token: repeatedly merge the lowest-ranked adjacent pair."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def _word_chain(word: str, merges: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Merges to append so that `word` ends as one token: fold the learned pieces left to right."""
    pieces = _apply_merges(list(word), {m: r for r, m in enumerate(merges)})
    chain, acc = [], pieces[0]
    for piece in pieces[1:]:
        chain.append((acc, piece))
        acc += piece
    return chain


def _build_regular_vocab(alphabet: list[str], learned: list[tuple[str, str]], words: list[str],
                         budget: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Largest prefix of the learned merges that fits `budget` regular ids once the plain words' chains are added.

    Returns (regular tokens in id order, all merges in rank order). Plain words themselves are excluded: they get
    their configured ids in the special range.
    """
    for num_merges in range(len(learned), -1, -1):
        merges = list(learned[:num_merges])
        for word in words:
            merges += [m for m in _word_chain(word, merges) if m not in merges]
        tokens = list(alphabet)
        for left, right in merges:
            if left + right not in tokens:
                tokens.append(left + right)
        tokens = [t for t in tokens if t not in words]
        if len(tokens) <= budget:
            return tokens, merges
    raise ValueError(f"regular vocabulary of {budget} ids cannot hold a {len(alphabet)}-symbol alphabet")


def write_tiny_tokenizer(out_dir: str | os.PathLike, special_tokens: dict[str, int], vocab_size: int) -> Path:
    """Train and save a small byte-level BPE tokenizer in the Qwen format.

    special_tokens: token → id. Names in PLAIN_WORD_TOKENS (`system`, `user`, `assistant`) become ordinary BPE
        words at the given id (as in the real vocab); every other entry becomes a special added token.
    vocab_size: total ids. Regular BPE tokens fill [0, first_special) with first_special = min(special ids); ids
        in [first_special, vocab_size) not named in `special_tokens` become special `<|reserved_N|>` tokens.

    With first_special >= 256 + 32 the alphabet is all 256 bytes, so any text round-trips. Below that the alphabet
    is tab/newline/CR plus printable ASCII, and other characters are dropped on encode — exactly what transformers'
    Qwen2Tokenizer (BPE without unk) does with the same files.

    Writes tokenizer.json, vocab.json + merges.txt (regular vocab only, like the released checkpoint) and
    tokenizer_config.json (loadable by transformers' AutoTokenizer, with a chat template). Returns out_dir.
    """
    from runtime.frontend.prompt import CHAT_TEMPLATE  # the Jinja twin of build_chat; avoids an import cycle

    ids = list(special_tokens.values())
    if len(set(ids)) != len(ids):
        raise ValueError(f"special token ids are not unique: {special_tokens}")
    if any(not 0 <= i < vocab_size for i in ids):
        raise ValueError(f"special token ids must lie in [0, {vocab_size}): {special_tokens}")
    first_special = min(ids)
    byte_map = _bytes_to_unicode()
    if first_special >= 256 + 32:
        alphabet = [byte_map[b] for b in range(256)]
    else:
        alphabet = _plain_ascii_alphabet(byte_map)
    words = [w for w in PLAIN_WORD_TOKENS if w in special_tokens]

    learned = _train_merges(alphabet, budget=first_special + 64)
    regular, merges = _build_regular_vocab(alphabet, learned, words, budget=first_special)

    vocab = {token: i for i, token in enumerate(regular)}
    names = dict(special_tokens)
    taken = set(vocab.values()) | set(names.values())
    next_regular = len(regular)
    for i in range(vocab_size):  # every id gets a token, so tokenizer and embedding sizes agree
        if i in taken:
            continue
        if i < first_special:
            names[f"<|reserved_{next_regular}|>"] = i  # corpus ran out of merges
            next_regular += 1
        else:
            names[f"<|reserved_{i}|>"] = i
    added = sorted(((i, t) for t, i in names.items() if t not in words), key=lambda x: x[0])
    full_vocab = dict(vocab)
    full_vocab.update({t: i for t, i in names.items()})

    backend = tokenizers.Tokenizer(_qwen_bpe(full_vocab, merges))
    _set_qwen_pipeline(backend)
    backend.add_tokens([AddedToken(t, special=True, normalized=False) for _, t in added])
    for token, token_id in names.items():
        if backend.token_to_id(token) != token_id:
            raise RuntimeError(f"{token!r} got id {backend.token_to_id(token)}, wanted {token_id}")
    for word in words:
        got = backend.encode(word, add_special_tokens=False).ids
        if got != [special_tokens[word]]:
            raise RuntimeError(f"plain word {word!r} encodes to {got}, wanted [{special_tokens[word]}]")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend.save(str(out / "tokenizer.json"))
    added_names = {t for _, t in added}
    regular_vocab = {t: i for t, i in full_vocab.items() if t not in added_names}
    (out / "vocab.json").write_text(json.dumps(regular_vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")

    pad = "<|endoftext|>" if "<|endoftext|>" in special_tokens else "<|im_end|>"
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True} for i, t in added},
        "bos_token": None,
        "eos_token": "<|im_end|>" if "<|im_end|>" in special_tokens else None,
        "pad_token": pad if pad in special_tokens else None,
        "unk_token": None,
        "extra_special_tokens": {k: v for k, v in PROCESSOR_TOKEN_ATTRIBUTES.items() if v in special_tokens},
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "model_max_length": 131072,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return out
