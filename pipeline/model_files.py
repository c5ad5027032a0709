"""A checkpoint's configs and tokenizer read without importing transformers, for lean loading.

Where no transformers model is built (lean loading: weights.py, llm/phi_direct.py,
mt/marian_direct.py), transformers was imported only for `AutoConfig`, `GenerationConfig` and
`AutoTokenizer`, and its import alone is 1.5-2.5 s of a cold `ask` on an H200 (0.97 s of it
`importlib.metadata.packages_distributions()`, which it calls at import; docs/benchmarks.md). The
tokenizers it builds for these checkpoints are thin shells over the tokenization libraries: phi-2's
`CodeGenTokenizer` runs its tokenizer.json in the tokenizers library, opus-mt's `MarianTokenizer`
maps sentencepiece's pieces through vocab.json. So for files of exactly the published shapes these
readers build the same from the same libraries; for anything else they return None and the caller
reads the checkpoint through transformers. tests/test_model_files.py holds each to transformers' own
classes, id for id and string for string, so a transformers release that reads them differently
fails there.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# The keys the lean modules and the fast engines read of each model type's config. A config.json
# without one of them is read by transformers, whose config classes supply defaults, except for
# the keys below that the published configs leave out: their defaults are transformers' own
# (tested against its config classes).
CONFIG_KEYS = {
    "phi": ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "max_position_embeddings", "layer_norm_eps", "hidden_act",
            "qk_layernorm", "tie_word_embeddings", "eos_token_id"),
    "marian": ("architectures", "d_model", "vocab_size", "max_position_embeddings", "encoder_layers",
               "decoder_layers", "encoder_ffn_dim", "decoder_ffn_dim", "encoder_attention_heads",
               "decoder_attention_heads", "activation_function", "normalize_before", "scale_embedding",
               "share_encoder_decoder_embeddings", "tie_word_embeddings", "pad_token_id", "eos_token_id",
               "decoder_start_token_id"),
}
CONFIG_DEFAULTS = {"marian": {"tie_word_embeddings": True}}
# phi's rotary settings: top-level keys in a 4.x config.json (as published), inside rope_parameters
# in a 5.x one; the fast engine reads either (llm/phi_weights.py rope_settings).
ROPE_KEYS = ("partial_rotary_factor", "rope_theta")
# What a generation config gives the fast translator and engine; GenerationConfig leaves each unset.
GENERATION_DEFAULTS = dict.fromkeys(("num_beams", "length_penalty", "forced_eos_token_id", "max_length",
                                     "eos_token_id", "pad_token_id", "decoder_start_token_id", "bad_words_ids"))
# Of those, what GenerationConfig.from_model_config takes from a config.json (transformers 5 configs
# keep the token ids; the generation settings in an old config.json, num_beams among them, are dropped).
FROM_MODEL_CONFIG = ("eos_token_id", "pad_token_id", "decoder_start_token_id", "forced_eos_token_id")


class ConfigFile:
    """A config.json's values as attributes, as transformers' config objects give them."""

    def __init__(self, values: dict):
        self.__dict__.update(values)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_config(directory: str | Path) -> ConfigFile | None:
    """The checkpoint's config.json where it is a phi or marian one holding every key the lean path
    reads (else None: read it with AutoConfig)."""
    return config_from(_json(Path(directory) / "config.json"))


def config_from(values: dict | None) -> ConfigFile | None:
    """read_config for a config.json already parsed."""
    kind = values.get("model_type") if values else None
    if kind not in CONFIG_KEYS:
        return None
    values = {**CONFIG_DEFAULTS.get(kind, {}), **values}
    if any(key not in values for key in CONFIG_KEYS[kind]):
        return None
    rope = values.get("rope_parameters") or {}
    if kind == "phi" and any(key not in values and key not in rope for key in ROPE_KEYS):
        return None
    return ConfigFile(values)


def read_generation_config(directory: str | Path, config: ConfigFile) -> ConfigFile:
    """generation_config.json's values, else the model config's own, as GenerationConfig reads them."""
    values = _json(Path(directory) / "generation_config.json")
    if values is None:
        values = {key: value for key, value in config.to_dict().items() if key in FROM_MODEL_CONFIG}
    return ConfigFile({key: values.get(key, default) for key, default in GENERATION_DEFAULTS.items()})


# ---- tokenizers ---------------------------------------------------------------------------------

# tokenizer_config.json keys that change nothing these readers do (metadata, or options they follow);
# any other key sends the tokenizer to transformers.
_INERT_KEYS = {"added_tokens_decoder", "backend", "bos_token", "eos_token", "unk_token", "pad_token",
               "model_max_length", "tokenizer_class", "name_or_path", "special_tokens_map_file", "tokenizer_file",
               "clean_up_tokenization_spaces", "source_lang", "target_lang", "padding_side", "truncation_side",
               "model_input_names", "errors"}
# ... and keys allowed only at the value that changes nothing.
_NEUTRAL_VALUES = {"add_prefix_space": False, "add_bos_token": False, "add_eos_token": False,
                   "return_token_type_ids": False, "separate_vocabs": False, "sp_model_kwargs": {},
                   "split_special_tokens": False, "additional_special_tokens": [], "extra_special_tokens": {}}


_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token")  # special_tokens_map.json may name these


def _token(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _named(settings: dict, role: str) -> str | None:
    """The `role` token (eos, unk, pad, bos) as the settings name it (None where they do not)."""
    return _token(settings.get(f"{role}_token")) or None


def _plain_settings(settings: dict) -> bool:
    return all(key in _INERT_KEYS or (key in _NEUTRAL_VALUES and value in (_NEUTRAL_VALUES[key], []))
               for key, value in settings.items())


def read_tokenizer(directory: str | Path):
    """A tokenizer for the checkpoint in `directory` that behaves as AutoTokenizer's would, where its
    files have the shape of phi-2's or opus-mt's; else None."""
    folder = Path(directory)
    settings = _json(folder / "tokenizer_config.json")
    if settings is None:
        settings = {} if not (folder / "tokenizer_config.json").exists() else None
    mapped = _json(folder / "special_tokens_map.json") or {}
    other_specials = [key for key, value in mapped.items() if value and key not in _NAMED_SPECIALS]
    if settings is None or not _plain_settings(settings) or other_specials:
        return None
    # tokenizer_config.json names the special tokens, else special_tokens_map.json does
    settings = {**settings, **{key: settings.get(key) or mapped[key] for key in _NAMED_SPECIALS if mapped.get(key)}}
    kind = settings.get("tokenizer_class") or (_json(folder / "config.json") or {}).get("model_type")
    if kind in ("CodeGenTokenizer", "CodeGenTokenizerFast"):
        return ByteLevelTokenizer.read(folder, settings)
    if kind in ("MarianTokenizer", "marian"):
        return SentencePieceMarian.read(folder, settings)
    return None


def _id_list(ids) -> list[int]:
    """Token ids as Python ints; a tensor's in one transfer (not one device sync per element)."""
    return [int(index) for index in (ids.tolist() if hasattr(ids, "tolist") else ids)]


def _encoded(encode, text, add_special_tokens: bool) -> dict:
    if isinstance(text, str):
        return {"input_ids": encode(text, add_special_tokens)}
    return {"input_ids": [encode(item, add_special_tokens) for item in text]}


class ByteLevelTokenizer:
    """phi-2's tokenizer: its tokenizer.json (byte-level BPE) run by the tokenizers library, as
    transformers' CodeGenTokenizer runs it (which skips the clean-up of spaces for BPE models)."""

    def __init__(self, tokenizer, eos_token: str | None):
        self.backend = tokenizer
        self.eos_token = eos_token
        self.eos_token_id = tokenizer.token_to_id(eos_token) if eos_token else None

    @classmethod
    def read(cls, folder: Path, settings: dict) -> "ByteLevelTokenizer | None":
        try:
            text = (folder / "tokenizer.json").read_text(encoding="utf-8")
            spec = json.loads(text)
        except (OSError, ValueError):
            return None
        if not isinstance(spec, dict) or not _byte_level_bpe(spec) or not _same_added_tokens(spec, settings):
            return None
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text), _named(settings, "eos"))  # the text read once, parsed here too

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text, add_special_tokens: bool = True, truncation: bool = False) -> dict:
        return _encoded(self.encode, text, add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> str:
        return self.backend.decode(_id_list(ids), skip_special_tokens=skip_special_tokens)


def _byte_level_bpe(spec: dict) -> bool:
    """tokenizer.json's pipeline is the one CodeGenTokenizer builds: byte-level BPE, no normaliser."""
    model, pre, decoder = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, spec.get("decoder") or {}
    return (model.get("type") == "BPE" and not model.get("continuing_subword_prefix")
            and not model.get("end_of_word_suffix") and model.get("dropout") is None
            and spec.get("normalizer") is None and pre.get("type") == "ByteLevel"
            and not pre.get("add_prefix_space") and pre.get("use_regex", True) and decoder.get("type") == "ByteLevel")


def _same_added_tokens(spec: dict, settings: dict) -> bool:
    """tokenizer_config.json adds no token, and changes none, that tokenizer.json does not hold."""
    held = {str(token["id"]): token for token in spec.get("added_tokens", [])}
    for index, token in (settings.get("added_tokens_decoder") or {}).items():
        known = held.get(str(index))
        if known is None or any(known.get(key) != value for key, value in token.items() if key != "__type"):
            return False
    named = [_named(settings, role) for role in ("bos", "eos", "unk", "pad")]
    contents = {token["content"] for token in held.values()}
    return all(name is None or name in contents for name in named)


# What transformers' clean_up_tokenization replaces, in its order (applied where a tokenizer's
# clean_up_tokenization_spaces is set, for tokenizers other than BPE ones).
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
_SPIECE_UNDERLINE = "\u2581"


class SentencePieceMarian:
    """opus-mt's tokenizer: sentencepiece pieces mapped through vocab.json (one vocabulary for both
    sides), `</s>` after each text, as transformers' MarianTokenizer does it."""

    def __init__(self, source, encoder: dict, specials: dict[str, str], settings: dict):
        self.source = source   # MarianTokenizer decodes with the source model too where vocabularies are shared
        self.encoder = encoder
        self.decoder = {index: piece for piece, index in encoder.items()}
        self.unk_token_id = encoder[specials["unk"]]
        self.eos_token_id, self.pad_token_id = encoder[specials["eos"]], encoder[specials["pad"]]
        self.special = {token: encoder[token] for token in specials.values()}
        self.special_ids = set(self.special.values())
        self.splitter = re.compile("(" + "|".join(map(re.escape, sorted(self.special, key=len, reverse=True))) + ")")
        self.source_lang, self.target_lang = settings.get("source_lang"), settings.get("target_lang")
        self.clean_up = bool(settings.get("clean_up_tokenization_spaces", False))

    @classmethod
    def read(cls, folder: Path, settings: dict) -> "SentencePieceMarian | None":
        encoder = _json(folder / "vocab.json")
        files = [folder / name for name in ("source.spm", "target.spm")]
        if encoder is None or not all(file.is_file() for file in files):
            return None
        defaults = {"eos": "</s>", "unk": "<unk>", "pad": "<pad>"}
        specials = {role: _named(settings, role) or token for role, token in defaults.items()}
        if not all(token in encoder for token in specials.values()):
            return None
        for index, token in (settings.get("added_tokens_decoder") or {}).items():  # only those, at their ids
            if _token(token) not in specials.values() or encoder[_token(token)] != int(index):
                return None
        import sentencepiece

        return cls(sentencepiece.SentencePieceProcessor(model_file=str(files[0])), encoder, specials, settings)

    def _pieces(self, chunk: str) -> list[str]:
        code = []
        if chunk.startswith(">>") and (end := chunk.find("<<")) != -1:  # a language code, kept whole
            code, chunk = [chunk[:end + 2]], chunk[end + 2:]
        return code + self.source.encode(chunk, out_type=str)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = []
        for chunk in self.splitter.split(text):   # special tokens written in the text stay whole
            if chunk in self.special:
                ids.append(self.special[chunk])
            elif chunk:
                ids.extend(self.encoder.get(piece, self.unk_token_id) for piece in self._pieces(chunk))
        return ids + [self.eos_token_id] if add_special_tokens else ids

    def __call__(self, text, add_special_tokens: bool = True, truncation: bool = False) -> dict:
        return _encoded(self.encode, text, add_special_tokens)

    def _piece(self, index: int) -> str:
        if index in self.decoder:
            return self.decoder[index]
        return self.source.id_to_piece(index) if 0 <= index < self.source.get_piece_size() else self.decoder[self.unk_token_id]

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> str:
        text, run = "", []
        for index in _id_list(ids):
            if index in self.special_ids:
                if not skip_special_tokens:   # a special token is written as itself, then a space
                    text, run = text + self.source.decode_pieces(run) + self.decoder[index] + " ", []
                continue
            run.append(self._piece(index))
        text = (text + self.source.decode_pieces(run)).replace(_SPIECE_UNDERLINE, " ").strip()
        clean = self.clean_up if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        for old, new in _CLEAN_UP if clean else ():
            text = text.replace(old, new)
        return text
