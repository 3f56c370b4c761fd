"""Benchmark language codes -> FLORES-200 / NLLB codes, validated against the MT tokenizer.

The authors' code mapped Greek to ell_Latn (NLLB has ell_Grek) and romanised variants to <unk>. Here every
benchmark code has one explicit FLORES-200 code, languages NLLB does not cover map to None, and resolving
such a language needs an explicit fallback from the config; an unknown code is an error naming it.
"""

from __future__ import annotations

import difflib

from mtllm_train.config import ConfigError

# XNLI (ISO 639-1)
XNLI = {"ar": "arb_Arab", "bg": "bul_Cyrl", "de": "deu_Latn", "el": "ell_Grek", "en": "eng_Latn", "es": "spa_Latn",
        "fr": "fra_Latn", "hi": "hin_Deva", "ru": "rus_Cyrl", "sw": "swh_Latn", "th": "tha_Thai", "tr": "tur_Latn",
        "ur": "urd_Arab", "vi": "vie_Latn", "zh": "zho_Hans"}
# AmericasNLI: only Aymara, Guarani and Quechua are NLLB-200 languages.
AMERICAS_NLI = {"aym": "ayr_Latn", "gn": "grn_Latn", "quy": "quy_Latn", "bzd": None, "cni": None, "hch": None,
                "nah": None, "oto": None, "shp": None, "tar": None}
# Kardes-NLU (Turkic)
KARDES_NLU = {"az": "azj_Latn", "kk": "kaz_Cyrl", "ky": "kir_Cyrl", "ug": "uig_Arab", "uz": "uzn_Latn"}
# NusaX sentiment: Batak Toba, Madurese and Ngaju are not NLLB-200 languages.
NUSAX = {"ace": "ace_Latn", "ban": "ban_Latn", "bjn": "bjn_Latn", "bug": "bug_Latn", "eng": "eng_Latn",
         "ind": "ind_Latn", "jav": "jav_Latn", "min": "min_Latn", "sun": "sun_Latn", "bbc": None, "mad": None,
         "nij": None}
# PAWS-X paraphrase pairs (ISO 639-1)
PAWSX = {"de": "deu_Latn", "en": "eng_Latn", "es": "spa_Latn", "fr": "fra_Latn", "ja": "jpn_Jpan", "ko": "kor_Hang",
         "zh": "zho_Hans"}
# XCOPA causal commonsense, two choices (ISO 639-1 / -3); Quechua is Ayacucho Quechua in NLLB-200.
XCOPA = {"et": "est_Latn", "ht": "hat_Latn", "id": "ind_Latn", "it": "ita_Latn", "qu": "quy_Latn", "sw": "swh_Latn",
         "ta": "tam_Taml", "th": "tha_Thai", "tr": "tur_Latn", "vi": "vie_Latn", "zh": "zho_Hans"}
# WikiANN NER, the 40 languages of its XTREME split (ISO 639-1; Malay is Standard Malay in NLLB-200).
WIKIANN = {"af": "afr_Latn", "ar": "arb_Arab", "bg": "bul_Cyrl", "bn": "ben_Beng", "de": "deu_Latn", "el": "ell_Grek",
           "en": "eng_Latn", "es": "spa_Latn", "et": "est_Latn", "eu": "eus_Latn", "fa": "pes_Arab", "fi": "fin_Latn",
           "fr": "fra_Latn", "he": "heb_Hebr", "hi": "hin_Deva", "hu": "hun_Latn", "id": "ind_Latn", "it": "ita_Latn",
           "ja": "jpn_Jpan", "jv": "jav_Latn", "ka": "kat_Geor", "kk": "kaz_Cyrl", "ko": "kor_Hang", "ml": "mal_Mlym",
           "mr": "mar_Deva", "ms": "zsm_Latn", "my": "mya_Mymr", "nl": "nld_Latn", "pt": "por_Latn", "ru": "rus_Cyrl",
           "sw": "swh_Latn", "ta": "tam_Taml", "te": "tel_Telu", "th": "tha_Thai", "tl": "tgl_Latn", "tr": "tur_Latn",
           "ur": "urd_Arab", "vi": "vie_Latn", "yo": "yor_Latn", "zh": "zho_Hans"}
# MasakhaNER 1.0 and 2.0 (ISO 639-3): Nigerian Pidgin and Ghomala are not NLLB-200 languages.
MASAKHANER = {"amh": "amh_Ethi", "bam": "bam_Latn", "bbj": None, "ewe": "ewe_Latn", "fon": "fon_Latn",
              "hau": "hau_Latn", "ibo": "ibo_Latn", "kin": "kin_Latn", "lug": "lug_Latn", "luo": "luo_Latn",
              "mos": "mos_Latn", "nya": "nya_Latn", "pcm": None, "sna": "sna_Latn", "swa": "swh_Latn",
              "tsn": "tsn_Latn", "twi": "twi_Latn", "wol": "wol_Latn", "xho": "xho_Latn", "yor": "yor_Latn",
              "zul": "zul_Latn"}
# UDPOS, the Universal Dependencies treebanks of XTREME (ISO 639-1).
UDPOS = {code: WIKIANN[code] for code in ("af", "ar", "bg", "de", "el", "en", "es", "et", "eu", "fa", "fi", "fr", "he",
                                          "hi", "hu", "id", "it", "ja", "kk", "ko", "mr", "nl", "pt", "ru", "ta", "te",
                                          "th", "tl", "tr", "ur", "vi", "yo", "zh")} | {"wo": "wol_Latn"}
BENCHMARKS = {"xnli": XNLI, "americas_nli": AMERICAS_NLI, "kardes_nlu": KARDES_NLU, "nusax": NUSAX, "pawsx": PAWSX,
              "xcopa": XCOPA, "wikiann": WIKIANN, "masakhaner": MASAKHANER, "udpos": UDPOS}
# Built-in benchmarks that use FLORES-200 codes already (flores: stage 1's probe sets; SIB-200: topic
# classification of FLORES-200 sentences in 205 languages).
FLORES_CODED = ("belebele", "flores", "sib200")


def resolve(code: str, benchmark: str, mt_codes: set[str], fallbacks: dict[str, str] | None = None) -> str:
    """The MT language code for `code` of `benchmark`.

    Belebele already uses FLORES-200 codes (e.g. ell_Grek); the benchmarks above go through their table; any
    other benchmark (your own) lists FLORES-200 codes too, or maps its own codes in `fallbacks`.
    `mt_codes` are the language tokens the MT tokenizer knows; `fallbacks` maps a benchmark code the MT model
    lacks to a code it has (say so in the config: e.g. {"nij": "ind_Latn"}).
    """
    fallbacks = fallbacks or {}
    if not benchmark:
        raise ConfigError(f"benchmark: a name for the evaluation set (its results are keyed by it): one of belebele, "
                          f"{', '.join(BENCHMARKS)}, or your own (with FLORES-200 codes as its languages)")
    table = BENCHMARKS.get(benchmark) or {c: c for c in mt_codes}  # FLORES_CODED and your own: FLORES-200 codes
    if code in fallbacks:
        target, reason = fallbacks[code], f"the fallback for {code!r}"
    elif code not in table and benchmark not in BENCHMARKS and benchmark not in FLORES_CODED:
        close = difflib.get_close_matches(code, sorted(table), n=2) or sorted(c for c in table if c.startswith(code))[:2]
        raise ConfigError(f"language {code!r} of {benchmark}: not a FLORES-200 code of the MT tokenizer"
                          f"{' (did you mean ' + ' or '.join(close) + '?)' if close else ''}; a benchmark without a "
                          f"built-in table lists FLORES-200 codes, or maps its own codes in task.language_fallbacks")
    elif code not in table:
        raise ConfigError(f"language {code!r} is not a {benchmark} language (known: {', '.join(sorted(table)[:12])}"
                          f"{', ...' if len(table) > 12 else ''})")
    elif table[code] is None:
        raise ConfigError(f"language {code!r} of {benchmark} has no NLLB-200 code; give an explicit fallback in "
                          f"the config (e.g. {{{code!r}: 'eng_Latn'}} or a related language)")
    else:
        target, reason = table[code], f"the code of {code!r}"
    if target not in mt_codes:
        raise ConfigError(f"{target!r} ({reason}) is not a language code of the MT tokenizer")
    return target
