"""The parameter filter language: strings that select parameters by path and rank.

Pure Python (no jax), so that `config.validate` can check filters without importing jax.
Filters are strings so that they can be overridden on the command line, e.g.
`"startswith:head/ or (ndim:2 and not contains:meta_)"`:
  contains:S  startswith:S  endswith:S  regex:S   the path ('stage3/blocks/attn/qkv/kernel');
                                                  quote S ('...' or "...") if it has spaces or ()
  ndim:N[,M..]  min_ndim:N  max_ndim:N            the per-block rank (a scanned stage's stacked
                                                  leading axis does not count)
  all  none  decayable                            decayable: the default weight-decay rule
  not  and  or  ( )                               in that order of precedence
"""

from __future__ import annotations

import functools
import re
from typing import Callable

Predicate = Callable[[str, tuple], bool]  # (path, per-block shape) -> bool


def decayable(path: str, shape: tuple) -> bool:
  """The default weight-decay rule: matrices and kernels, not biases/norms/tokens/RoPE freqs."""
  parts = path.split("/")
  name = parts[-1]
  return (len(shape) >= 2 and name not in ("bias", "freqs") and "token" not in name
          and not any("norm" in p for p in parts))


def _ndims(values: str) -> Predicate:
  wanted = {int(v) for v in values.split(",")}
  return lambda path, shape: len(shape) in wanted


ATOMS: dict[str, Callable[[str], Predicate]] = {
    "contains": lambda s: lambda path, shape: s in path,
    "startswith": lambda s: lambda path, shape: path.startswith(s),
    "endswith": lambda s: lambda path, shape: path.endswith(s),
    "regex": lambda s: (lambda r: lambda path, shape: r.search(path) is not None)(re.compile(s)),
    "ndim": _ndims,
    "min_ndim": lambda s: lambda path, shape: len(shape) >= int(s),
    "max_ndim": lambda s: lambda path, shape: len(shape) <= int(s),
}
KEYWORDS: dict[str, Predicate] = {
    "all": lambda path, shape: True,
    "none": lambda path, shape: False,
    "decayable": decayable,
}
_TOKEN = re.compile(r"""\s*(?:(?P<paren>[()])|(?P<kind>\w+):(?:'(?P<q1>[^']*)'|"(?P<q2>[^"]*)"|"""
                    r"""(?P<bare>[^\s()]+))|(?P<word>\w+)|(?P<bad>\S+))""")


def _tokens(text: str) -> list[tuple[str, ...]]:
  out = []
  for m in _TOKEN.finditer(text):
    if m["paren"]:
      out.append((m["paren"],))
    elif m["kind"]:
      value = next(v for v in (m["q1"], m["q2"], m["bare"]) if v is not None)
      out.append(("atom", m["kind"], value))
    elif m["word"]:
      out.append((m["word"],) if m["word"] in ("and", "or", "not") else ("atom", m["word"], None))
    elif m["bad"]:
      raise ValueError(f"unexpected {m['bad']!r}")
  return out


@functools.lru_cache(maxsize=None)
def parse(text: str) -> Predicate:
  """The predicate of a filter string; ValueError says what is wrong with it."""
  toks, pos = _tokens(text), 0
  if not toks:
    raise ValueError("empty filter")

  def peek():
    return toks[pos][0] if pos < len(toks) else None

  def take(expected):
    nonlocal pos
    what = "a rule (kind:value, all, none, decayable)" if expected == "atom" else repr(expected)
    if pos >= len(toks):
      raise ValueError(f"ends early: expected {what}")
    if toks[pos][0] != expected:
      raise ValueError(f"expected {what} at token {pos + 1}, got {toks[pos][0]!r}")
    pos += 1
    return toks[pos - 1]

  def joined(word, operand, combine):
    """operand (word operand)*, combined with `combine` (any for 'or', all for 'and')."""
    terms = [operand()]
    while peek() == word:
      take(word)
      terms.append(operand())
    return terms[0] if len(terms) == 1 else (lambda p, s: combine(t(p, s) for t in terms))

  disjunction = lambda: joined("or", conjunction, any)
  conjunction = lambda: joined("and", negation, all)

  def negation():
    if peek() == "not":
      take("not")
      inner = negation()
      return lambda p, s: not inner(p, s)
    if peek() == "(":
      take("(")
      inner = disjunction()
      take(")")
      return inner
    tok = take("atom")
    _, kind, value = tok
    if value is None:
      if kind not in KEYWORDS:
        raise ValueError(f"unknown word {kind!r} (keywords: {sorted(KEYWORDS)})")
      return KEYWORDS[kind]
    if kind not in ATOMS:
      raise ValueError(f"unknown rule {kind}: (rules: {sorted(ATOMS)})")
    try:
      return ATOMS[kind](value)
    except (ValueError, re.error) as e:
      raise ValueError(f"bad value in {kind}:{value} ({e})") from None

  pred = disjunction()
  if pos != len(toks):
    raise ValueError(f"unexpected {toks[pos][0] if toks[pos][0] != 'atom' else toks[pos][1]!r} "
                     f"at token {pos + 1} (join rules with and / or)")
  return pred


def problem(text: str) -> str | None:
  """None if `text` is a valid filter, else what is wrong with it."""
  try:
    parse(text)
  except ValueError as e:
    return str(e)
  return None
