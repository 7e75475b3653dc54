"""Optional scrubbing of personal data with Presidio's pattern recognisers only.

Presidio's default analyzer loads a spaCy NER model, a download that is not on PyPI. The pattern
recognisers (regular expressions plus checksums and context words) need no model, so they are
run directly, without an ``AnalyzerEngine`` and its NLP engine: e-mail, phone, credit card, IP
address, IBAN, URL, crypto wallet and US SSN. Each match is replaced by ``<ENTITY_TYPE>`` with
presidio-anonymizer (overlaps resolved there).

One deviation from Presidio's defaults: its e-mail recogniser validates the domain with
``tldextract``, whose default extractor fetches the public-suffix list over the network on first
use; here the same check runs on tldextract's bundled snapshot, so scrubbing never needs the
network.

Cost: importing Presidio takes about 10 s here, because its analyzer package imports
transformers (for NLP engines this module never uses) when that is installed; the scrubbing
itself is fast. spaCy is imported as a library, but no spaCy model is needed or loaded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cache
from typing import Any, TypeVar

from guardrail.continuation import ChatTemplate
from offline.harvest.funnel import FilterResult
from offline.harvest.pairs import DEFAULT_TEMPLATE, PreferencePair, rerender
from offline.harvest.records import UnsafeChainRecord

T = TypeVar("T")

DEFAULT_ENTITIES: tuple[str, ...] = (
    "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IP_ADDRESS", "IBAN_CODE", "URL",
    "CRYPTO", "US_SSN",
)


@dataclass(frozen=True, slots=True)
class ScrubOptions:
    entities: tuple[str, ...] = DEFAULT_ENTITIES
    min_score: float = 0.4
    """Presidio's pattern scores: phone numbers score 0.4 without context words."""


@cache
def _recognizers() -> tuple[Any, ...]:
    import tldextract
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        CryptoRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
        UrlRecognizer,
        UsSsnRecognizer,
    )

    # No suffix-list URLs: tldextract uses its bundled snapshot (see the module docstring).
    offline = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return bool(offline(pattern_text).fqdn)

    return (OfflineEmailRecognizer(), PhoneRecognizer(), CreditCardRecognizer(), IpRecognizer(),
            IbanRecognizer(), UrlRecognizer(), CryptoRecognizer(), UsSsnRecognizer())


class Scrubber:
    """Finds and replaces personal data in text; counts what it replaced, by entity type."""

    def __init__(self, options: ScrubOptions | None = None) -> None:
        from presidio_anonymizer import AnonymizerEngine

        self.options = options or ScrubOptions()
        self._recognizers = [recognizer for recognizer in _recognizers()
                             if set(recognizer.supported_entities) & set(self.options.entities)]
        self._anonymizer: Any = AnonymizerEngine()  # type: ignore[no-untyped-call]
        self.found: Counter[str] = Counter()

    def scrub(self, text: str) -> str:
        if not text:
            return text
        results: list[Any] = []
        for recognizer in self._recognizers:
            entities = [entity for entity in recognizer.supported_entities
                        if entity in self.options.entities]
            # nlp_artifacts=None: pattern recognisers need no NLP engine.
            results.extend(result for result in recognizer.analyze(text, entities, None)
                           if result.score >= self.options.min_score)
        if not results:
            return text
        anonymized = self._anonymizer.anonymize(text=text, analyzer_results=results)
        # Counted after the anonymizer resolved overlaps (a URL match inside an e-mail address
        # is part of the address, not a second entity).
        self.found.update(item.entity_type for item in anonymized.items)
        text_out: str = anonymized.text
        return text_out


def scrub_records(records: Sequence[UnsafeChainRecord],
                  options: ScrubOptions | None = None) -> FilterResult[UnsafeChainRecord]:
    """Every text field of every record scrubbed. Nothing is removed; ``details`` counts the
    records changed and the entities replaced, by type."""
    return scrub_texts(records, ("prompt", "response", "unsafe_response"), options)


def scrub_pairs(pairs: Sequence[PreferencePair], template: ChatTemplate | str = DEFAULT_TEMPLATE,
                options: ScrubOptions | None = None) -> FilterResult[PreferencePair]:
    """Each pair's texts scrubbed and its prompt rendered again (so it still ends with the
    scrubbed prefix)."""
    return scrub_texts(pairs, ("request", "prefix", "chosen", "rejected"), options,
                       rebuild=lambda pair, updates: rerender(pair, template, **updates))


def scrub_texts(records: Sequence[T], field_names: Sequence[str],
                options: ScrubOptions | None = None,
                rebuild: Callable[[T, dict[str, str]], T] | None = None) -> FilterResult[T]:
    """``field_names`` of each (dataclass) record scrubbed; ``rebuild`` makes the new record
    (default: :func:`dataclasses.replace`)."""
    scrubber = Scrubber(options)
    result: FilterResult[T] = FilterResult("scrub", [])
    changed = 0
    for record in records:
        updates = {}
        for name in field_names:
            text = getattr(record, name)
            cleaned = scrubber.scrub(text)
            if cleaned != text:
                updates[name] = cleaned
        if updates:
            changed += 1
            record = rebuild(record, updates) if rebuild else replace(  # type: ignore[type-var]
                record, **updates)
        result.kept.append(record)
    result.details = {"records_changed": changed, "entities": dict(sorted(scrubber.found.items()))}
    return result
