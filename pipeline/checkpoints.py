"""Build checkpoints in the published formats of phi-2 and MarianMT, with random weights.

For tests (tiny shapes) and benchmarks (the published shapes: speed depends on shape, not on weight
values), on machines that cannot download the real models. They build their own checkpoints: the published config.json with smaller dimensions,
random safetensors weights, Marian sentencepiece files trained on a small corpus written here, and a
byte-level BPE tokenizer for phi-2. The product's own loading code then reads them exactly as it
reads a hub download.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

PUBLISHED = Path(__file__).parent / "published_configs"

ENGLISH_CORPUS = """\
How do rising interest rates affect households and companies?
When interest rates rise, borrowing becomes more expensive for people and firms.
Companies may delay new investments because loans cost more.
Households often spend less and save more when rates are high.
What is inflation and why does it matter?
Inflation is the rate at which prices rise over time.
Central banks raise rates to slow down inflation.
A bond pays a fixed interest to its holder until it matures.
Stocks represent a share of ownership in a company.
Diversification spreads risk across many different assets.
The exchange rate tells how much one currency is worth in another.
A weaker yen makes Japanese exports cheaper abroad.
Mortgage payments increase when variable rates go up.
Saving early lets compound interest work for a long time.
The budget shows income, spending and the balance left over.
Please explain the difference between a loan and a lease.
Write a short answer in plain English.
Exercise 3: calculate the interest on a loan of 1000 dollars.
Question: what happens to bond prices when rates rise?
Answer: bond prices usually fall when interest rates rise.
def compound(principal, rate, years):
    return principal * (1 + rate) ** years
print(compound(1000, 0.05, 10))
The quick brown fox jumps over the lazy dog.
It was a sunny day, and the market opened higher than expected.
Economists disagree about how fast the economy will grow next year.
""".splitlines()

JAPANESE_CORPUS = """\
金利が上昇すると、どのように個人や企業の経済活動に影響を与えるのでしょうか？
金利が上がると、人や企業にとって借り入れの費用が高くなります。
企業は融資の費用が増えるので、新しい投資を遅らせることがあります。
金利が高いとき、家計は支出を減らし、貯蓄を増やすことが多いです。
インフレとは何ですか、そしてなぜ重要なのですか？
インフレは物価が時間とともに上昇する割合です。
中央銀行はインフレを抑えるために金利を引き上げます。
債券は満期まで保有者に一定の利息を支払います。
株式は会社の所有権の一部を表します。
分散投資はリスクを多くの異なる資産に広げます。
為替レートはある通貨が別の通貨でどれだけの価値があるかを示します。
円安は日本の輸出品を海外で安くします。
変動金利が上がると住宅ローンの返済額が増えます。
早く貯蓄を始めると複利が長い間働きます。
予算は収入、支出、そして残った残高を示します。
ローンとリースの違いを説明してください。
簡単な日本語で短く答えてください。
今日は晴れていて、市場は予想よりも高く始まりました。
経済学者は来年の経済成長の速さについて意見が分かれています。
東京の株式市場は午後に少し下がりました。
これはペンです。私は学生です。
ひらがな、カタカナ、漢字を使って文章を書きます。
""".splitlines()

EOS = "<|endoftext|>"


def _train_sentencepiece(lines: list[str], prefix: Path, vocab_size: int) -> None:
    import sentencepiece as spm

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write("\n".join(lines * 4))
    spm.SentencePieceTrainer.train(
        input=f.name,
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    Path(f.name).unlink()


def _spm_pieces(model_file: Path) -> list[str]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def build_tiny_marian(path: Path, source: str, target: str, *, d_model: int = 32,
                      layers: int = 2, ffn: int = 64, heads: int = 4, vocab_size: int | None = None) -> Path:
    """A MarianMT checkpoint of the published opus-mt schema with tiny dimensions.

    `vocab_size` pads the vocabulary with unused pieces up to a published size (60716 for
    opus-mt-ja-en), so benchmarks pay the published embedding and output-projection costs.

    Like the published models: `</s>` is id 0, `<unk>` id 1, `<pad>` the last id and the decoder
    start; source.spm/target.spm are sentencepiece models; vocab.json maps pieces of both to ids.
    """
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    corpora = {"ja": JAPANESE_CORPUS, "en": ENGLISH_CORPUS}
    work = path / "_spm"
    work.mkdir(exist_ok=True)
    _train_sentencepiece(corpora[source], work / "source", 250)
    _train_sentencepiece(corpora[target], work / "target", 250)
    (work / "source.model").rename(path / "source.spm")
    (work / "target.model").rename(path / "target.spm")
    for leftover in work.iterdir():
        leftover.unlink()
    work.rmdir()

    vocab = {"</s>": 0, "<unk>": 1}
    for piece in _spm_pieces(path / "source.spm") + _spm_pieces(path / "target.spm"):
        if piece not in vocab and piece not in ("<s>", "</s>", "<unk>", "<pad>"):
            vocab[piece] = len(vocab)
    while vocab_size is not None and len(vocab) < vocab_size - 1:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    pad_id = len(vocab)
    vocab["<pad>"] = pad_id
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")

    published = json.loads((PUBLISHED / "Helsinki-NLP--opus-mt-ja-en" / "config.json").read_text())
    published.update(
        d_model=d_model, encoder_layers=layers, decoder_layers=layers, num_hidden_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
        vocab_size=pad_id + 1, decoder_vocab_size=pad_id + 1,
        pad_token_id=pad_id, decoder_start_token_id=pad_id, bad_words_ids=[[pad_id]],
    )
    config = MarianConfig(**published)
    torch.manual_seed(0)
    model = MarianMTModel(config).eval()
    # With the default tiny init every input decodes to the same token; a wider spread makes the
    # output depend on the input, as a trained model's does, so tests can tell rows apart.
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.dim() == 2 and "layer_norm" not in name and "embed_positions" not in name:
                weight.normal_(0, 0.3)
        model.model.shared.weight[pad_id].zero_()  # as in the published checkpoints (padding_idx)
    # The generation_config.json published beside opus-mt checkpoints.
    for key in ("bad_words_ids", "bos_token_id", "decoder_start_token_id", "eos_token_id",
                "forced_eos_token_id", "max_length", "num_beams", "pad_token_id"):
        setattr(model.generation_config, key, published[key])
    model.save_pretrained(path, safe_serialization=True)
    tokenizer = MarianTokenizer(
        source_spm=str(path / "source.spm"), target_spm=str(path / "target.spm"),
        vocab=str(path / "vocab.json"), source_lang=source, target_lang=target,
    )
    tokenizer.save_pretrained(path)
    return path


def build_phi2_tokenizer(path: Path):
    """A byte-level BPE tokenizer like phi-2's (CodeGen/GPT-2 style), trained on the small corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator(ENGLISH_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS,
        model_max_length=2048, clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(path)
    config_file = Path(path) / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config["tokenizer_class"] = "CodeGenTokenizer"  # as published for phi-2
    config_file.write_text(json.dumps(tokenizer_config, indent=1))
    return tokenizer


def phi2_config(**shape):
    """The published phi-2 config, with `shape` overriding its dimensions."""
    from transformers import PhiConfig

    published = json.loads((PUBLISHED / "microsoft--phi-2" / "config.json").read_text())
    for key in ("_name_or_path", "transformers_version", "torch_dtype", "architectures"):
        published.pop(key, None)
    published.update(shape)
    return PhiConfig(**published)


def build_tiny_phi2(path: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                    dtype: torch.dtype = torch.float32, vocab_rows: int | None = None,
                    device: str = "cpu") -> Path:
    """A PhiForCausalLM checkpoint of the published schema with tiny dimensions.

    With hidden=2560, layers=32, heads=32, vocab_rows=51200 it has phi-2's published shape (random
    weights; build it on a GPU with device="cuda", dtype=torch.float16 to take seconds, not minutes).
    """
    from transformers import PhiForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_phi2_tokenizer(path)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    # phi-2 pads its embedding past the tokenizer too
    vocab_rows = vocab_rows or ((len(tokenizer) + 63) // 64) * 64
    config = phi2_config(
        hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab_rows,
        bos_token_id=eos_id, eos_token_id=eos_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = PhiForCausalLM(config).eval().to(dtype)
    model.generation_config.pad_token_id = eos_id
    model.save_pretrained(path, safe_serialization=True)
    return path


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")


def build_lora_adapter(path: Path, base_dir: Path, *, base_name: str | None = None, r: int = 8,
                       targets=LORA_TARGETS, modules_to_save=None, seed: int = 1, scale: float = 0.05,
                       device: str = "cpu", dtype: torch.dtype | None = None) -> Path:
    """A PEFT LoRA adapter of the phi-2 checkpoint in `base_dir`, made by peft itself, in the layout
    `PeftModel.save_pretrained` writes (adapter_config.json, adapter_model.safetensors).

    peft starts B at zero (the adapter changes nothing); here B is drawn at random, as after training,
    so the adapter's answers differ from the base's. `base_name` is written as
    `base_model_name_or_path` (default: `base_dir`). Saved modules (`modules_to_save`) are perturbed too.
    peft's low-level API, not `get_peft_model`: its PeftModel wrapper reads transformers' deprecated
    `is_gradient_checkpointing` and so prints a FutureWarning (llm/adapters.py loads the same way).
    """
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file
    from transformers import PhiForCausalLM

    path = Path(path)
    model = PhiForCausalLM.from_pretrained(base_dir, dtype=dtype or "auto", device_map={"": device})
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), task_type="CAUSAL_LM",
                        modules_to_save=list(modules_to_save) if modules_to_save else None,
                        base_model_name_or_path=base_name or str(base_dir))
    inject_adapter_in_model(config, model)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                noise = torch.randn(parameter.shape, generator=generator, device=device, dtype=parameter.dtype)
                parameter.add_(noise * scale)
    # What PeftModel saves: the adapter's tensors under the wrapper's prefix, and its config. The
    # vocabulary is never resized here: peft's "auto" would look the base up on the hub to check.
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    tensors = {f"base_model.model.{key}": tensor.detach().contiguous() for key, tensor in state.items()}
    path.mkdir(parents=True, exist_ok=True)
    config.inference_mode = True  # as save_pretrained writes it
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(path))
    return path


def build_phi_msft(path: Path, phi2_dir: Path) -> Path:
    """The phi-2 checkpoint in `phi2_dir` rewritten in phi-2's older custom-code layout (phi-msft):
    its config field names, `Wqkv` fused, `out_proj`, `lm_head.ln` and `lm_head.linear`."""
    import shutil

    from safetensors.torch import load_file, save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    phi = json.loads((Path(phi2_dir) / "config.json").read_text())
    hidden, heads = phi["hidden_size"], phi["num_attention_heads"]
    factor = (phi.get("rope_parameters") or {}).get("partial_rotary_factor", phi.get("partial_rotary_factor", 0.4))
    legacy_config = {
        "_name_or_path": "microsoft/phi-2", "architectures": ["PhiForCausalLM"], "model_type": "phi-msft",
        "auto_map": {"AutoConfig": "configuration_phi.PhiConfig", "AutoModelForCausalLM": "modeling_phi.PhiForCausalLM"},
        "activation_function": phi["hidden_act"], "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.1,
        "flash_attn": False, "flash_rotary": False, "fused_dense": False, "img_processor": None,
        "initializer_range": 0.02, "layer_norm_epsilon": phi["layer_norm_eps"], "n_embd": hidden,
        "n_head": heads, "n_head_kv": None, "n_inner": None, "n_layer": phi["num_hidden_layers"],
        "n_positions": phi["max_position_embeddings"], "rotary_dim": int(hidden // heads * factor),
        "tie_word_embeddings": False, "torch_dtype": "float32", "vocab_size": phi["vocab_size"],
    }
    (path / "config.json").write_text(json.dumps(legacy_config, indent=1))
    state = load_file(str(Path(phi2_dir) / "model.safetensors"))
    legacy = {"transformer.embd.wte.weight": state.pop("model.embed_tokens.weight"),
              "lm_head.ln.weight": state.pop("model.final_layernorm.weight"),
              "lm_head.ln.bias": state.pop("model.final_layernorm.bias"),
              "lm_head.linear.weight": state.pop("lm_head.weight"), "lm_head.linear.bias": state.pop("lm_head.bias")}
    for layer in range(phi["num_hidden_layers"]):
        old, new = f"model.layers.{layer}.", f"transformer.h.{layer}."
        for kind in ("weight", "bias"):
            legacy[f"{new}mixer.Wqkv.{kind}"] = torch.cat(
                [state.pop(f"{old}self_attn.{p}.{kind}") for p in ("q_proj", "k_proj", "v_proj")])
            legacy[f"{new}mixer.out_proj.{kind}"] = state.pop(f"{old}self_attn.dense.{kind}")
            legacy[f"{new}ln.{kind}"] = state.pop(f"{old}input_layernorm.{kind}")
            for fc in ("fc1", "fc2"):
                legacy[f"{new}mlp.{fc}.{kind}"] = state.pop(f"{old}mlp.{fc}.{kind}")
    if state:
        raise ValueError(f"tensors left unconverted: {sorted(state)[:3]}")
    save_file({k: v.contiguous() for k, v in legacy.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    for file in Path(phi2_dir).iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(file, path / file.name)
    return path


def seed_hub_cache(hub_cache: Path, repo_id: str, directory: Path) -> None:
    """Put `directory` into a Hugging Face hub cache (HF_HOME/hub) as the snapshot of `repo_id`, where an
    offline run finds it as it finds a download."""
    import shutil

    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    shutil.copytree(directory, repo / "snapshots" / commit, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


@dataclass(frozen=True)
class TinyModels:
    """The directories of a tiny set: the three models of the pipeline and a LoRA adapter of the phi-2."""

    llm: Path
    ja_en: Path
    en_ja: Path
    adapter: Path


def build_tiny_models(directory: Path) -> TinyModels:
    """phi-2, opus-mt-ja-en, fugumt-en-ja and a LoRA fine-tune of that phi-2, each in its published
    format with tiny shapes and random weights, in `directory`: the whole pipeline runs on them (the
    answers are noise; the loading, translation, answering, batching and serving are the real code)."""
    directory = Path(directory).resolve()
    llm = build_tiny_phi2(directory / "phi-2")
    adapter = build_lora_adapter(directory / "phi-2-finance-lora", llm)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # as a published adapter ships its tokenizer
        (adapter / name).write_bytes((llm / name).read_bytes())
    return TinyModels(llm=llm, ja_en=build_tiny_marian(directory / "opus-mt-ja-en", "ja", "en"),
                      en_ja=build_tiny_marian(directory / "fugumt-en-ja", "en", "ja"), adapter=adapter)
