"""FireRedASR-AED's tokenizer as a Hugging Face tokenizer: the original's ChineseCharEnglishSpmTokenizer.

`FireRedAsrAedTokenizer` reads the release's own files, copied into the converted
repo (`dict.txt`, `train_bpe1000.model`), and tokenizes as the original does:
upper-case the text, replace ，。？！,.?! by spaces, make every CJK character a
token and cut the text between them (stripped) into SentencePiece pieces; a token
missing from dict.txt is `<unk>`. Decoding joins the tokens, turns SentencePiece's
word marker into a space and strips the ends. Special tokens in the text are not
treated specially (the original has no such notion); `skip_special_tokens=True`
leaves out dict.txt's special tokens (`<blank>`, `<unk>`, `<pad>`, `<sos>`, `<eos>`),
which the original's detokenize keeps.

The class is registered with `AutoTokenizer` by `register_with_transformers`, so a
converted repo loads without `trust_remote_code`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import sentencepiece
from transformers import PreTrainedTokenizer

from . import aed_spec
from .aed_release import read_dict
from .errors import ConversionError

TOKENIZER_CLASS = "FireRedAsrAedTokenizer"
# dict.txt's special tokens by role, as FireRedASR-AED-L names them; roles whose token a dict lacks are left unset.
SPECIAL_TOKENS = {
    "unk_token": aed_spec.UNK_TOKEN,
    "pad_token": "<pad>",
    "bos_token": "<sos>",
    "eos_token": "<eos>",
}
BLANK_TOKEN = "<blank>"


def load_spm_model(path: Path) -> sentencepiece.SentencePieceProcessor:
    """The SentencePiece model at `path`, or a ValueError naming the file."""
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (OSError, RuntimeError) as error:
        raise ValueError(f"{path} is not a SentencePiece model ({str(error).strip()[:80]})") from None
    return processor


class FireRedAsrAedTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"dict_file": aed_spec.DICT_FILE, "spm_file": aed_spec.SPM_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, dict_file: str, spm_file: str, **kwargs):
        try:
            self.tokens = read_dict(Path(dict_file))
        except ConversionError as error:
            raise ValueError(str(error)) from None
        self.token_ids = {token: index for index, token in enumerate(self.tokens)}
        self.dict_file, self.spm_file = str(dict_file), str(spm_file)
        self.sp = load_spm_model(Path(spm_file))
        if aed_spec.UNK_TOKEN not in self.token_ids:
            raise ValueError(f"{dict_file} has no {aed_spec.UNK_TOKEN} token")
        for role, token in SPECIAL_TOKENS.items():
            if token in self.token_ids:
                kwargs.setdefault(role, token)
        if BLANK_TOKEN in self.token_ids:
            kwargs.setdefault("extra_special_tokens", [BLANK_TOKEN])
        # The original splits no special token out of the text.
        kwargs["split_special_tokens"] = True
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.token_ids)

    def tokenize(self, text: str, **kwargs) -> list[str]:
        """The original's tokenize: the pieces, before the dict lookup."""
        text = aed_spec.PUNCTUATION.sub(" ", text.upper())
        tokens: list[str] = []
        for part in aed_spec.CJK_CHARACTER.split(text.strip()):
            if not part.strip():
                continue
            if aed_spec.CJK_CHARACTER.fullmatch(part):
                tokens.append(part)
            else:
                tokens.extend(self.sp.EncodeAsPieces(part.strip()))
        return tokens

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.tokenize(text)

    def _convert_token_to_id(self, token: str) -> int:
        return self.token_ids.get(token, self.token_ids[aed_spec.UNK_TOKEN])

    def _convert_id_to_token(self, index: int) -> str:
        return self.tokens[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens).replace(aed_spec.SPM_SPACE, " ").strip()

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return self.convert_tokens_to_string([self.tokens[i] for i in token_ids if i not in special])

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        written = []
        for source, name in ((self.dict_file, aed_spec.DICT_FILE), (self.spm_file, aed_spec.SPM_FILE)):
            target = Path(save_directory) / f"{prefix}{name}"
            if Path(source).resolve() != target.resolve():
                shutil.copyfile(source, target)
            written.append(str(target))
        return tuple(written)
