/* Statement bookkeeping of one PostgreSQL session in C: the twin of tracker.StatementTracker plus
 * the evidence row of SessionInfo.statement_event, for a relay thread that does not hold the GIL.
 * Header-only, C99 with malloc/free (and GCC's __atomic builtins for the verdicts' reference
 * counts); every function is static (inline only to keep unused ones quiet): each extension that
 * includes this header gets its own copy.
 *
 * What the caller feeds, and what comes out:
 *   client → server  pgt_client_message(type, body) per decoded message (body without its 5-byte
 *                    header), pgt_client_copy_bytes(n) as Relay.from_client does.
 *   server → client  pgt_server_frames(chunk, frames, end, trailing) per read, exactly as
 *                    StatementTracker.server_frames; or per frame pgt_rows / pgt_server_bytes /
 *                    pgt_server_message as Relay.from_server_masked does.
 *   evidence         each completed statement is appended to `events` as one JSON line, byte for
 *                    byte what orjson.dumps(info.statement_event(statement), default=str,
 *                    option=orjson.OPT_APPEND_NEWLINE) writes (keys in the same order, orjson's
 *                    escaping and float formatting).
 *
 * Return codes of the message functions:
 *   PGT_OK         done.
 *   PGT_VIOLATION  the message is malformed where Python raises m.ProtocolViolation. Client messages
 *                  leave the state unchanged (Python parses before it records anything); a server
 *                  frame leaves it exactly as Python's would be (bytes already attributed, a
 *                  ParameterDescription's pending name already taken): the caller ends the session
 *                  and calls pgt_abandon.
 *   PGT_PUNT       (client messages only) this port does not handle the message: nothing changed,
 *                  the caller hands the session to Python before it. pgt_export describes the state
 *                  only at a quiescent point (pgt_in_flight() == 0): with groups in flight, hold the
 *                  punted message (and what follows) back until their answers have been fed.
 *   PGT_NOMEM      out of memory; the tracker may be half way through a message: end the session.
 *
 * What PUNTs: FunctionCall 'F'; a Query, Parse or Bind body in which pgt_might_hold_secret finds a
 * hint (Python would redact: a superset of redact.might_hold_secret, so the C path never records a
 * text redact_statement/redact_conninfo would change); an Execute whose binary int2/int4/int8
 * parameter is longer than 8 bytes (Python prints any size of integer). Everything else is
 * reproduced, including UTF-8 decoding with errors="replace" (CPython's maximal-subpart policy),
 * repr() of binary float4/float8 parameters and the code-point truncation of long parameters.
 *
 * Guardrails: the caller judges; a Query's or Parse's verdict comes with the message (NULL: None),
 * as a pgt_verdict (below) when a rule matched without stopping the statement (a `log` rule). It is
 * kept where tracker.py keeps it: on the Query's statement, on a prepared statement (judged) for
 * each Execute of it, on its group (parse_verdict) for an error answering the Parse. Verdicts that
 * stop a statement never get here (the caller hands the session to Python), so every row's
 * activity_name is "query". StatementTracker.server_frames' `notable` callback has no C counterpart
 * (it only serves guardrail rewrites and ParameterStatus under a guard).
 *
 * Numbers: rows and bytes are uint64_t (saturating where a tag's count would overflow; Python's
 * ints would not, but orjson could not write them either).
 *
 * Timing: Statement.started/started_mono are the now_wall/now_mono of the Query or Execute. A
 * "parse" statement (an error before any Execute) is created on the server side, where only
 * now_mono is given: its wall time is now_mono plus the (wall - mono) offset of the last client
 * message, where Python reads time.time() (the same up to clock slew).
 *
 * Memory: groups live in a ring of slots whose buffers are reused, statement strings in a per-group
 * arena (already JSON-escaped), prepared statements and portals in hash maps with the unnamed ""
 * ones held inline. A statement in steady state costs no malloc; once no group is in flight, large
 * buffers are released and at most a few small ones stay. */
#ifndef PROCTOR_PGTRACK_H
#define PROCTOR_PGTRACK_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../_sha256.h"

#define PGT_OK 0
#define PGT_VIOLATION (-1)
#define PGT_PUNT 1
#define PGT_NOMEM (-2)

#define PGT_MAX_PARAMETER_CHARS 1024 /* tracker.MAX_PARAMETER_CHARS */

/* ------------------------------------------------------------------------------------------------
 * growable byte buffer
 * ---------------------------------------------------------------------------------------------- */

typedef struct {
    char *data;
    size_t len, cap;
} pgt_buf;

static inline int
pgt_buf_reserve(pgt_buf *b, size_t extra)
{
    size_t need, cap;
    char *p;
    if (extra <= b->cap - b->len)
        return 0;
    if (extra > SIZE_MAX - b->len)
        return -1;
    need = b->len + extra;
    cap = b->cap ? b->cap : 64;
    while (cap < need)
        cap = cap > SIZE_MAX / 2 ? need : cap * 2;
    p = (char *)realloc(b->data, cap);
    if (p == NULL)
        return -1;
    b->data = p;
    b->cap = cap;
    return 0;
}

static inline void
pgt_buf_free(pgt_buf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

static inline int
pgt_buf_append(pgt_buf *b, const void *p, size_t n)
{
    if (pgt_buf_reserve(b, n) < 0)
        return -1;
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
    return 0;
}

/* Appends without a capacity check: the caller reserved. */
static inline void
pgt__put(pgt_buf *b, const void *p, size_t n)
{
    memcpy(b->data + b->len, p, n);
    b->len += n;
}
#define PGT__LIT(b, s) pgt__put((b), (s), sizeof(s) - 1)

/* ------------------------------------------------------------------------------------------------
 * verdicts
 * ---------------------------------------------------------------------------------------------- */

/* A guardrails verdict that lets its statement through, as its evidence row shows it: the row's
 * members (`"rule":…,"approval_id":…`) and the details' member (`"guardrail":{…}`, empty without
 * matched rules), byte for byte what orjson writes of SessionInfo.statement_event's, and the whole
 * verdict for StatementTracker.restore (tracker.verdict_fields makes all three). Immutable, shared by
 * reference count: atomic, since a rule set's shape cache hands one verdict to every relay thread. */
typedef struct {
    size_t refs;
    const char *row, *details, *doc;
    size_t row_len, details_len, doc_len;
    char data[];
} pgt_verdict;

static inline pgt_verdict *
pgt_verdict_new(const char *row, size_t row_len, const char *details, size_t details_len, const char *doc,
                size_t doc_len)
{
    pgt_verdict *v;
    char *p;
    if (row_len > SIZE_MAX / 4 || details_len > SIZE_MAX / 4 || doc_len > SIZE_MAX / 4)
        return NULL;
    v = (pgt_verdict *)malloc(sizeof *v + row_len + details_len + doc_len + 1);
    if (v == NULL)
        return NULL;
    v->refs = 1;
    p = v->data;
    v->row = p;
    v->row_len = row_len;
    if (row_len)
        memcpy(p, row, row_len);
    p += row_len;
    v->details = p;
    v->details_len = details_len;
    if (details_len)
        memcpy(p, details, details_len);
    p += details_len;
    v->doc = p;
    v->doc_len = doc_len;
    if (doc_len)
        memcpy(p, doc, doc_len);
    return v;
}

/* Another reference (v may be NULL: no verdict). */
static inline pgt_verdict *
pgt_verdict_ref(pgt_verdict *v)
{
    if (v != NULL)
        __atomic_fetch_add(&v->refs, 1, __ATOMIC_RELAXED);
    return v;
}

static inline void
pgt_verdict_unref(pgt_verdict *v)
{
    if (v != NULL && __atomic_sub_fetch(&v->refs, 1, __ATOMIC_ACQ_REL) == 0)
        free(v);
}

/* *slot holds a reference to v from now on (the one it held before is released). */
static inline void
pgt__verdict_set(pgt_verdict **slot, pgt_verdict *v)
{
    pgt_verdict *old = *slot;
    *slot = pgt_verdict_ref(v);
    pgt_verdict_unref(old);
}

/* One frame of a server chunk, as data_plane.postgres.framescan.scan_frames reports it:
 * (msg_type, offset of its type byte in the chunk, 1 + length (type byte and body), frames skipped
 * (DataRow/CopyData, counted as rows) since the previous reported frame). Four uint32_t in this
 * order, so an array of uint32_t[4] has the same layout. */
typedef struct {
    uint32_t type, offset, size, skipped;
} pgt_frame;

/* ------------------------------------------------------------------------------------------------
 * wire integers
 * ---------------------------------------------------------------------------------------------- */

static inline uint32_t
pgt__u32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static inline int64_t
pgt__i32(const unsigned char *p)
{
    uint32_t u = pgt__u32(p);
    return u >= 0x80000000u ? (int64_t)u - INT64_C(0x100000000) : (int64_t)u;
}

static inline int
pgt__i16(const unsigned char *p)
{
    int v = (p[0] << 8) | p[1];
    return v >= 0x8000 ? v - 0x10000 : v;
}

/* ------------------------------------------------------------------------------------------------
 * UTF-8 as CPython decodes it with errors="replace", and JSON strings as orjson writes them
 * ---------------------------------------------------------------------------------------------- */

/* At p[0] (n >= 1 bytes left): the length of a well-formed sequence, or 0 for an ill-formed one
 * whose maximal subpart (*skip bytes: a truncated but valid prefix, or the lead byte alone) becomes
 * one U+FFFD, which is CPython's policy. */
static inline size_t
pgt__utf8_seq(const unsigned char *p, size_t n, size_t *skip)
{
    unsigned c = p[0], lo = 0x80, hi = 0xBF;
    size_t need, i;
    if (c < 0x80)
        return 1;
    if (c < 0xC2 || c > 0xF4) {
        *skip = 1;
        return 0;
    }
    if (c < 0xE0) {
        need = 2;
    } else if (c < 0xF0) {
        need = 3;
        if (c == 0xE0)
            lo = 0xA0; /* overlong */
        else if (c == 0xED)
            hi = 0x9F; /* surrogates */
    } else {
        need = 4;
        if (c == 0xF0)
            lo = 0x90; /* overlong */
        else if (c == 0xF4)
            hi = 0x8F; /* above U+10FFFF */
    }
    for (i = 1; i < need; i++) {
        if (i >= n || p[i] < lo || p[i] > hi) {
            *skip = i;
            return 0;
        }
        lo = 0x80;
        hi = 0xBF;
    }
    return need;
}

static inline uint32_t
pgt__utf8_code_point(const unsigned char *p, size_t k)
{
    switch (k) {
    case 1:
        return p[0];
    case 2:
        return ((uint32_t)(p[0] & 0x1F) << 6) | (p[1] & 0x3F);
    case 3:
        return ((uint32_t)(p[0] & 0x0F) << 12) | ((uint32_t)(p[1] & 0x3F) << 6) | (p[2] & 0x3F);
    default:
        return ((uint32_t)(p[0] & 0x07) << 18) | ((uint32_t)(p[1] & 0x3F) << 12) | ((uint32_t)(p[2] & 0x3F) << 6) |
               (p[3] & 0x3F);
    }
}

static inline int
pgt__utf8_valid(const unsigned char *p, size_t n)
{
    size_t i = 0, k, skip;
    while (i < n) {
        if (p[i] < 0x80) {
            i++;
            continue;
        }
        k = pgt__utf8_seq(p + i, n - i, &skip);
        if (k == 0)
            return 0;
        i += k;
    }
    return 1;
}

/* bytes.decode("utf-8", errors="replace"), re-encoded: appended to out. */
static inline int
pgt__utf8_replace(pgt_buf *out, const unsigned char *p, size_t n)
{
    size_t i = 0, k, skip;
    if (n > (SIZE_MAX - 16) / 3 || pgt_buf_reserve(out, 3 * n) < 0)
        return -1;
    while (i < n) {
        k = pgt__utf8_seq(p + i, n - i, &skip);
        if (k) {
            pgt__put(out, p + i, k);
            i += k;
        } else {
            PGT__LIT(out, "\xEF\xBF\xBD");
            i += skip;
        }
    }
    return 0;
}

static const char pgt__hex[] = "0123456789abcdef";

/* The content of a JSON string (no quotes) holding p[:n] decoded with errors="replace", as orjson
 * escapes it: \" \\ \b \t \n \f \r, other controls as \u00xx, everything else (DEL and non-ASCII
 * included) as is. max_chars > 0: at most that many code points, then "…" if more followed (Python's
 * text[:max_chars] + "…"). */
static inline int
pgt__json_text(pgt_buf *out, const unsigned char *p, size_t n, size_t max_chars)
{
    size_t i = 0, chars = 0, k, skip;
    while (i < n) {
        unsigned c;
        if (out->cap - out->len < 8) {
            size_t want = n - i < 8192 ? 6 * (n - i) + 8 : 6 * 8192;
            if (pgt_buf_reserve(out, want) < 0)
                return -1;
        }
        if (max_chars && chars == max_chars) {
            PGT__LIT(out, "\xE2\x80\xA6");
            return 0;
        }
        c = p[i];
        if (c >= 0x20 && c < 0x80) {
            if (c == '"' || c == '\\')
                out->data[out->len++] = '\\';
            out->data[out->len++] = (char)c;
            i++;
        } else if (c < 0x20) {
            char e = c == '\b' ? 'b' : c == '\t' ? 't' : c == '\n' ? 'n' : c == '\f' ? 'f' : c == '\r' ? 'r' : 0;
            out->data[out->len++] = '\\';
            if (e) {
                out->data[out->len++] = e;
            } else {
                PGT__LIT(out, "u00");
                out->data[out->len++] = pgt__hex[c >> 4];
                out->data[out->len++] = pgt__hex[c & 15];
            }
            i++;
        } else if ((k = pgt__utf8_seq(p + i, n - i, &skip)) != 0) {
            pgt__put(out, p + i, k);
            i += k;
        } else {
            PGT__LIT(out, "\xEF\xBF\xBD");
            i += skip;
        }
        chars++;
    }
    return 0;
}

/* The inverse of pgt__json_text's escaping (for pgt_export). */
static inline int
pgt__json_unescape(pgt_buf *out, const char *p, size_t n)
{
    size_t i = 0;
    if (pgt_buf_reserve(out, n) < 0)
        return -1;
    while (i < n) {
        char c = p[i++];
        if (c != '\\' || i >= n) {
            out->data[out->len++] = c;
            continue;
        }
        c = p[i++];
        switch (c) {
        case 'b': c = '\b'; break;
        case 't': c = '\t'; break;
        case 'n': c = '\n'; break;
        case 'f': c = '\f'; break;
        case 'r': c = '\r'; break;
        case 'u':
            if (i + 4 <= n) {
                const char *h = p + i + 2;
                int hi = h[0] <= '9' ? h[0] - '0' : h[0] - 'a' + 10, lo = h[1] <= '9' ? h[1] - '0' : h[1] - 'a' + 10;
                c = (char)(hi * 16 + lo);
                i += 4;
            }
            break;
        default: break; /* \" and \\ */
        }
        out->data[out->len++] = c;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * secrets: the conservative twin of redact.might_hold_secret / redact_statement's hint
 * ---------------------------------------------------------------------------------------------- */

/* "password" at p, ASCII case-insensitively, where U+017F (ſ, C5 BF) also counts as an 's': the
 * case folding of Python's str regex, which redact_statement applies to non-ASCII text. */
static inline int
pgt__password_at(const unsigned char *p, size_t n)
{
    static const char word[] = "password";
    size_t i = 0, w;
    for (w = 0; w < 8; w++) {
        if (i >= n)
            return 0;
        if ((p[i] | 0x20) == (unsigned char)word[w]) {
            i++;
        } else if (word[w] == 's' && p[i] == 0xC5 && i + 1 < n && p[i + 1] == 0xBF) {
            i += 2;
        } else {
            return 0;
        }
    }
    return 1;
}

/* Whether text may carry a secret that Python's redaction would rewrite: "://" anywhere, or
 * "password" as pgt__password_at matches it. A superset of redact._HINT on the bytes and of
 * _HINT_TEXT on their decoded text (decoding with errors="replace" never joins ASCII letters). */
static inline int
pgt_might_hold_secret(const unsigned char *p, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) {
        unsigned c = p[i];
        if (c == ':') {
            if (i + 2 < n && p[i + 1] == '/' && p[i + 2] == '/')
                return 1;
        } else if ((c | 0x20) == 'p' && pgt__password_at(p + i, n - i)) {
            return 1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * messages.rows_from_tag
 * ---------------------------------------------------------------------------------------------- */

/* The code points whose str.isdecimal() digit is 0 beyond ASCII, each starting a run of ten
 * (Unicode 14.0, CPython 3.11): int() accepts them. */
static const uint32_t pgt__decimal_zeros[] = {
    0x660, 0x6f0, 0x7c0, 0x966, 0x9e6, 0xa66, 0xae6, 0xb66, 0xbe6, 0xc66, 0xce6, 0xd66, 0xde6,
    0xe50, 0xed0, 0xf20, 0x1040, 0x1090, 0x17e0, 0x1810, 0x1946, 0x19d0, 0x1a80, 0x1a90, 0x1b50,
    0x1bb0, 0x1c40, 0x1c50, 0xa620, 0xa8d0, 0xa900, 0xa9d0, 0xa9f0, 0xaa50, 0xabf0, 0xff10, 0x104a0,
    0x10d30, 0x11066, 0x110f0, 0x11136, 0x111d0, 0x112f0, 0x11450, 0x114d0, 0x11650, 0x116c0, 0x11730,
    0x118e0, 0x11950, 0x11c50, 0x11d50, 0x11da0, 0x16a60, 0x16ac0, 0x16b50, 0x1d7ce, 0x1d7d8, 0x1d7e2,
    0x1d7ec, 0x1d7f6, 0x1e140, 0x1e2f0, 0x1e950, 0x1fbf0,
};

static inline int
pgt__decimal_value(uint32_t c)
{
    size_t lo = 0, hi = sizeof(pgt__decimal_zeros) / sizeof(pgt__decimal_zeros[0]);
    if (c >= '0' && c <= '9')
        return (int)(c - '0');
    if (c < 0x660)
        return -1;
    while (lo < hi) { /* the last zero <= c */
        size_t mid = (lo + hi) / 2;
        if (pgt__decimal_zeros[mid] <= c)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0 || c - pgt__decimal_zeros[lo - 1] > 9)
        return -1;
    return (int)(c - pgt__decimal_zeros[lo - 1]);
}

/* str.isspace(), which str.split() splits on. */
static inline int
pgt__space(uint32_t c)
{
    if (c < 0x80)
        return c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F);
    return c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
           c == 0x202F || c == 0x205F || c == 0x3000;
}

/* rows_from_tag(tag): 1 and *rows when the tag's last whitespace-separated part (of two or more)
 * is a number, else 0. Python's int() of a part that isdigit() but holds a non-decimal digit
 * (superscripts, circled numbers) raises ValueError out of the tracker: here it is no number.
 * Counts beyond 2**64 - 1 (which orjson could not write either) saturate. */
static inline int
pgt__rows_from_tag(const unsigned char *p, size_t n, uint64_t *rows)
{
    size_t i = 0, k, skip;
    int parts = 0, in_part = 0, decimal = 0;
    uint64_t value = 0;
    while (i < n) {
        uint32_t c;
        k = pgt__utf8_seq(p + i, n - i, &skip);
        if (k) {
            c = pgt__utf8_code_point(p + i, k);
            i += k;
        } else {
            c = 0xFFFD;
            i += skip;
        }
        if (pgt__space(c)) {
            in_part = 0;
        } else {
            int d = pgt__decimal_value(c);
            if (!in_part) {
                in_part = 1;
                parts++;
                decimal = 1;
                value = 0;
            }
            if (d < 0)
                decimal = 0;
            else if (decimal)
                value = value > (UINT64_MAX - (uint64_t)d) / 10 ? UINT64_MAX : value * 10 + (uint64_t)d;
        }
    }
    if (parts >= 2 && decimal) {
        *rows = value;
        return 1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * numbers as Python and orjson print them
 * ---------------------------------------------------------------------------------------------- */

static inline size_t
pgt__u64_digits(char *out, uint64_t v)
{
    char tmp[20];
    size_t n = 0, i;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (i = 0; i < n; i++)
        out[i] = tmp[n - 1 - i];
    return n;
}

static inline void
pgt__put_u64(pgt_buf *b, uint64_t v)
{
    b->len += pgt__u64_digits(b->data + b->len, v);
}

static inline void
pgt__put_i64(pgt_buf *b, int64_t v)
{
    if (v < 0) {
        b->data[b->len++] = '-';
        pgt__put_u64(b, (uint64_t)0 - (uint64_t)v);
    } else {
        pgt__put_u64(b, (uint64_t)v);
    }
}

/* The correctly rounded `precision`-significant-digit decimal of x > 0: its digits (trailing zeros
 * stripped) and decpt, with x ~ 0.DIGITS * 10**decpt. */
static inline size_t
pgt__decimal_digits(double x, int precision, char digits[24], int *decpt)
{
    char text[40];
    const char *p = text;
    size_t n = 0;
    snprintf(text, sizeof text, "%.*e", precision - 1, x);
    for (; *p && *p != 'e'; p++)
        if (*p >= '0' && *p <= '9')
            digits[n++] = *p;
    *decpt = atoi(p + 1) + 1;
    while (n > 1 && digits[n - 1] == '0')
        n--;
    return n;
}

/* DIGITS * 10**exponent read back (no decimal point: whatever LC_NUMERIC says); n <= 400. */
static inline double
pgt__read_decimal(const char *digits, size_t n, int exponent)
{
    char text[420];
    memcpy(text, digits, n);
    snprintf(text + n, sizeof text - n, "e%d", exponent);
    return strtod(text, NULL);
}

static inline int
pgt__round_trips(const char *digits, size_t n, int decpt, double x)
{
    return pgt__read_decimal(digits, n, decpt - (int)n) == x;
}

/* The shortest digits that read back as x > 0 (finite), the closest to x among those: what
 * repr() (dtoa mode 0) and orjson print. The correctly rounded p-digit decimal reads back for every
 * p from the shortest on, except next to a power of two, where the gap below x is half the gap
 * above: there the decimal just above x can read back where the nearest (below) does not. */
static inline size_t
pgt__shortest(double x, char digits[24], int *decpt)
{
    uint64_t bits;
    size_t n;
    int lo = 1, hi = 17, p;
    memcpy(&bits, &x, sizeof bits);
    if ((bits & ((UINT64_C(1) << 52) - 1)) == 0 && (bits >> 52) > 1) {
        for (p = 1; p <= 17; p++) {
            char up[24];
            size_t i;
            int up_decpt;
            n = pgt__decimal_digits(x, p, digits, decpt);
            if (pgt__round_trips(digits, n, *decpt, x))
                return n;
            /* the p-digit decimal just above the (lower) nearest one */
            n = pgt__decimal_digits(x, p, up, &up_decpt);
            while (n < (size_t)p)
                up[n++] = '0';
            for (i = n; i > 0 && up[i - 1] == '9'; i--)
                up[i - 1] = '0';
            if (i == 0) {
                up[0] = '1';
                n = 1;
                up_decpt++;
            } else {
                up[i - 1]++;
            }
            while (n > 1 && up[n - 1] == '0')
                n--;
            if (pgt__round_trips(up, n, up_decpt, x)) {
                memcpy(digits, up, n);
                *decpt = up_decpt;
                return n;
            }
        }
    }
    while (lo < hi) {
        p = (lo + hi) / 2;
        n = pgt__decimal_digits(x, p, digits, decpt);
        if (pgt__round_trips(digits, n, *decpt, x))
            hi = p;
        else
            lo = p + 1;
    }
    return pgt__decimal_digits(x, lo, digits, decpt);
}

/* A finite double as repr() (orjson = 0: fixed for 1e-4 <= |x| < 1e16, else d.ddde-05) or as orjson
 * writes it (orjson = 1: fixed for 1e-5 <= |x| < 1e16, else d.ddde-5 / d.ddde+16). Fixed notation
 * always has a fractional part ("12.0"). Returns the length written to out (>= 32 bytes). */
static inline size_t
pgt__format_double(char *out, double x, int orjson)
{
    char digits[24];
    size_t n, len = 0, i;
    int decpt;
    if (x != x || x - x != 0) { /* nan, infinite */
        const char *text = orjson ? "null" : x != x ? "nan" : x < 0 ? "-inf" : "inf";
        len = strlen(text);
        memcpy(out, text, len);
        return len;
    }
    if (x < 0 || (x == 0 && 1 / x < 0)) {
        out[len++] = '-';
        x = -x;
    }
    if (x == 0) {
        memcpy(out + len, "0.0", 3);
        return len + 3;
    }
    n = pgt__shortest(x, digits, &decpt);
    if (decpt <= (orjson ? -5 : -4) || decpt > 16) {
        out[len++] = digits[0];
        if (n > 1) {
            out[len++] = '.';
            memcpy(out + len, digits + 1, n - 1);
            len += n - 1;
        }
        if (orjson)
            len += (size_t)sprintf(out + len, "e%+d", decpt - 1);
        else
            len += (size_t)sprintf(out + len, "e%+03d", decpt - 1);
    } else if (decpt <= 0) {
        memcpy(out + len, "0.", 2);
        len += 2;
        for (i = 0; i < (size_t)-decpt; i++)
            out[len++] = '0';
        memcpy(out + len, digits, n);
        len += n;
    } else if ((size_t)decpt >= n) {
        memcpy(out + len, digits, n);
        len += n;
        for (i = n; i < (size_t)decpt; i++)
            out[len++] = '0';
        memcpy(out + len, ".0", 2);
        len += 2;
    } else {
        memcpy(out + len, digits, (size_t)decpt);
        len += (size_t)decpt;
        out[len++] = '.';
        memcpy(out + len, digits + decpt, n - (size_t)decpt);
        len += n - (size_t)decpt;
    }
    return len;
}

/* round(x, 3) (dtoa's correctly rounded 3-decimal string read back) as orjson writes it, for a
 * finite x in milliseconds. Below 1e12 the rounded value's shortest repr is that 3-decimal string
 * without its trailing zeros (15 significant digits at most), and the rounding is done here exactly:
 * x * 1000 as the exact sum of two doubles (1000 = 8 * 125, x split into 26-bit halves), rounded
 * half-even to an integer. Beyond, "%.3f" (glibc: exact, half-even) and the general formatting. */
static inline size_t
pgt__format_ms(char *out /* >= 40 bytes */, double x)
{
    uint64_t bits;
    memcpy(&bits, &x, sizeof bits);
    if (x != x || x - x != 0) {
        memcpy(out, "null", 4);
        return 4;
    }
    if (x < 1e12 && x > -1e12) {
        const double magic = 6755399441055744.0; /* 1.5 * 2**52: adding it rounds half-even to an integer */
        double split = x * 134217729.0, xh = split - (split - x), xl = x - xh;
        double a = xh * 1000, b = xl * 1000, sum = a + b, bb = sum - a;
        double err = (a - (sum - bb)) + (b - bb); /* a + b == sum + err exactly */
        double n = (sum + magic) - magic, d = sum - n;
        uint64_t q, whole;
        unsigned frac;
        size_t len = 0;
        if ((d == 0.5 || d == -0.5) && err != 0) /* sum is a tie, the exact product is not */
            n = (err > 0) == (d > 0) ? n + 2 * d : n;
        if (n < 0 || (n == 0 && (bits >> 63)))
            out[len++] = '-';
        q = (uint64_t)(n < 0 ? -n : n);
        whole = q / 1000;
        frac = (unsigned)(q % 1000);
        len += pgt__u64_digits(out + len, whole);
        out[len++] = '.';
        out[len++] = (char)('0' + frac / 100);
        if (frac % 100) {
            out[len++] = (char)('0' + frac / 10 % 10);
            if (frac % 10)
                out[len++] = (char)('0' + frac % 10);
        }
        return len;
    } else { /* the digits of "%.3f" (its decimal point is the locale's), read back as DIGITS e-3 */
        char text[400], digits[400];
        size_t i, n = 0;
        double r;
        snprintf(text, sizeof text, "%.3f", x);
        for (i = 0; text[i]; i++)
            if (text[i] >= '0' && text[i] <= '9')
                digits[n++] = text[i];
        r = pgt__read_decimal(digits, n, -3);
        return pgt__format_double(out, x < 0 ? -r : r, 1);
    }
}

/* Statement.duration_ms as orjson writes it: round((finished - started) * 1000, 3). */
static inline size_t
pgt__format_duration(char *out /* >= 40 bytes */, double finished, double started)
{
    return pgt__format_ms(out, (finished - started) * 1000);
}

/* ------------------------------------------------------------------------------------------------
 * the tracker's state
 * ---------------------------------------------------------------------------------------------- */

#define PGT__NONE SIZE_MAX

typedef struct { /* a string in a group's arena; off == PGT__NONE: None */
    size_t off, len;
} pgt__span;

typedef struct { /* data_plane.core.session.Statement */
    double started, started_mono, finished_mono;
    uint64_t rows, bytes;
    pgt__span text, tag, params, sqlstate, error; /* JSON-escaped; params: the JSON list */
    pgt_verdict *verdict;                          /* a reference, or NULL: None */
    unsigned char finished, skipped, parse_kind;
} pgt__stmt;

typedef struct { /* tracker._Group */
    pgt__stmt *stmts;
    size_t n, cap, cursor;
    pgt_buf arena;        /* the strings of the group's statements: dropped with the group */
    pgt__span parse_text; /* the last Parse's query, escaped */
    pgt_verdict *parse_verdict; /* and its verdict (a reference) */
    pgt__span *described; /* names (decoded, not escaped) awaiting a ParameterDescription */
    size_t described_first, described_n, described_cap;
    unsigned char simple, failed;
} pgt__group;

typedef struct {
    char *name;
    size_t name_len;
    uint64_t hash;
} pgt__key;

typedef struct { /* open addressing, linear probing, backward-shift deletion */
    pgt__key **slots;
    size_t cap, count;
} pgt__map;

typedef struct { /* m.Parse, with its query as the evidence shows it and its verdict (tracker.judged) */
    pgt__key key;
    pgt_buf query; /* JSON-escaped */
    pgt_verdict *verdict;
    uint32_t *types;
    size_t ntypes, types_cap;
} pgt__prepared;

typedef struct { /* (statement name, m.Bind): the Bind body is kept and decoded again at Execute */
    pgt__key key;
    pgt_buf statement; /* decoded */
    pgt_buf bind;
} pgt__portal;

enum { PGT__NO_GROUP, PGT__IN_FIFO, PGT__DETACHED };

/* What turns a statement row into the evidence row the shipper ships (EventTemplate.expand), but for
 * the template's members, which are the same in every row of the session: the session's template
 * rendered once (tracker.full_row_parts), so that the C data path writes rows the shipper only
 * completes (it splices the template's `,"column":value` members, contract.c_row_parts, in place of
 * the closing `,"tv":N`) and compresses. The optional members are the ones a row may or may not set
 * itself: sqlstate, status_detail, rule, approval_id, details. */
#define PGT_OPTIONAL_MEMBERS 5
enum { PGT__SQLSTATE, PGT__STATUS_DETAIL, PGT__RULE, PGT__APPROVAL_ID, PGT__DETAILS };

typedef struct {
    char *session_id; /* event ids: session_event_id(session_id, seq) */
    size_t session_id_len;
    char *absent[PGT_OPTIONAL_MEMBERS]; /* `,"column":value` from the template, for a row without it */
    size_t absent_len[PGT_OPTIONAL_MEMBERS];
    int64_t iso_second; /* the last whole second formatted, as iso_millis caches it */
    char iso[24];
    pgt_buf details; /* scratch: the details object before it becomes a JSON string */
} pgt_full;

/* A copy of the parts; NULL when out of memory. */
static inline pgt_full *
pgt_full_new(const char *session_id, size_t session_id_len, const char *const absent[PGT_OPTIONAL_MEMBERS],
             const size_t absent_len[PGT_OPTIONAL_MEMBERS])
{
    size_t total = session_id_len, i;
    pgt_full *f;
    char *p;
    for (i = 0; i < PGT_OPTIONAL_MEMBERS; i++)
        total += absent_len[i];
    f = (pgt_full *)calloc(1, sizeof *f + total + 1);
    if (f == NULL)
        return NULL;
    p = (char *)(f + 1);
    f->session_id = p;
    f->session_id_len = session_id_len;
    memcpy(p, session_id, session_id_len);
    p += session_id_len;
    for (i = 0; i < PGT_OPTIONAL_MEMBERS; i++) {
        f->absent[i] = p;
        f->absent_len[i] = absent_len[i];
        memcpy(p, absent[i], absent_len[i]);
        p += absent_len[i];
    }
    f->iso_second = INT64_MIN;
    return f;
}

static inline void
pgt_full_free(pgt_full *f)
{
    if (f == NULL)
        return;
    pgt_buf_free(&f->details);
    free(f);
}

struct pgt_tracker {
    pgt__group *ring; /* the FIFO of groups awaiting answers: ring[head .. head+size) */
    size_t ring_cap, head, size;
    uint64_t head_seq; /* each group's number in the session; the head group's */
    /* tracker._open: none, a group of the FIFO, or a group the server already answered with a
     * ReadyForQuery before its Sync (Python keeps appending to that object; nobody sees it again) */
    int open_state;
    uint64_t open_seq;
    int copy_state; /* tracker._copy_in: where client COPY bytes go */
    uint64_t copy_seq;
    size_t copy_index;
    uint64_t since_tag;
    double wall_offset; /* now_wall - now_mono of the last client message */
    int record_parameters, template_version;
    int64_t seq;
    uint64_t statements, errors, skipped, ok;
    pgt__prepared unnamed_prepared;
    pgt__portal unnamed_portal;
    int has_unnamed_prepared, has_unnamed_portal;
    pgt__map prepared, portals;
    pgt_buf scratch[3];
    pgt_full *full; /* NULL: compact rows, which the shipper expands */
};

typedef struct pgt_tracker pgt_tracker;

/* ------------------------------------------------------------------------------------------------
 * maps of named prepared statements and portals
 * ---------------------------------------------------------------------------------------------- */

static inline uint64_t
pgt__hash(const char *p, size_t n)
{
    uint64_t h = UINT64_C(0xcbf29ce484222325);
    size_t i;
    for (i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= UINT64_C(0x100000001b3);
    }
    h ^= h >> 33; /* fmix64: FNV's low bits alone cluster */
    h *= UINT64_C(0xff51afd7ed558ccd);
    h ^= h >> 33;
    return h;
}

static inline size_t
pgt__map_find(const pgt__map *m, const char *name, size_t n, uint64_t hash)
{
    size_t mask, i;
    if (m->cap == 0)
        return PGT__NONE;
    mask = m->cap - 1;
    for (i = hash & mask; m->slots[i] != NULL; i = (i + 1) & mask) {
        const pgt__key *k = m->slots[i];
        if (k->hash == hash && k->name_len == n && memcmp(k->name, name, n) == 0)
            return i;
    }
    return PGT__NONE;
}

static inline int
pgt__map_insert(pgt__map *m, pgt__key *key)
{
    size_t mask, i;
    if ((m->count + 1) * 2 > m->cap) {
        size_t cap = m->cap ? m->cap * 2 : 8, j;
        pgt__key **slots = (pgt__key **)calloc(cap, sizeof *slots);
        if (slots == NULL)
            return -1;
        for (j = 0; j < m->cap; j++) {
            pgt__key *k = m->slots[j];
            if (k != NULL) {
                for (i = k->hash & (cap - 1); slots[i] != NULL; i = (i + 1) & (cap - 1)) {
                }
                slots[i] = k;
            }
        }
        free(m->slots);
        m->slots = slots;
        m->cap = cap;
    }
    mask = m->cap - 1;
    for (i = key->hash & mask; m->slots[i] != NULL; i = (i + 1) & mask) {
    }
    m->slots[i] = key;
    m->count++;
    return 0;
}

static inline pgt__key *
pgt__map_take(pgt__map *m, size_t i)
{
    size_t mask = m->cap - 1, j = i;
    pgt__key *taken = m->slots[i];
    m->slots[i] = NULL;
    m->count--;
    for (;;) { /* shift back the entries whose probe run crossed the hole */
        size_t home;
        j = (j + 1) & mask;
        if (m->slots[j] == NULL)
            break;
        home = m->slots[j]->hash & mask;
        if (i <= j ? (home <= i || home > j) : (home <= i && home > j)) {
            m->slots[i] = m->slots[j];
            m->slots[j] = NULL;
            i = j;
        }
    }
    return taken;
}

static inline void
pgt__prepared_clear(pgt__prepared *p)
{
    free(p->key.name);
    pgt_buf_free(&p->query);
    free(p->types);
    pgt__verdict_set(&p->verdict, NULL);
}

static inline void
pgt__portal_clear(pgt__portal *p)
{
    free(p->key.name);
    pgt_buf_free(&p->statement);
    pgt_buf_free(&p->bind);
}

static inline pgt__prepared *
pgt__prepared_get(pgt_tracker *t, const char *name, size_t n)
{
    size_t i;
    if (n == 0)
        return t->has_unnamed_prepared ? &t->unnamed_prepared : NULL;
    i = pgt__map_find(&t->prepared, name, n, pgt__hash(name, n));
    return i == PGT__NONE ? NULL : (pgt__prepared *)t->prepared.slots[i];
}

static inline pgt__portal *
pgt__portal_get(pgt_tracker *t, const char *name, size_t n)
{
    size_t i;
    if (n == 0)
        return t->has_unnamed_portal ? &t->unnamed_portal : NULL;
    i = pgt__map_find(&t->portals, name, n, pgt__hash(name, n));
    return i == PGT__NONE ? NULL : (pgt__portal *)t->portals.slots[i];
}

/* The entry of `name` in a map, created empty when missing (size: of the entry struct). */
static inline pgt__key *
pgt__map_entry(pgt__map *m, const char *name, size_t n, size_t size)
{
    uint64_t hash = pgt__hash(name, n);
    size_t i = pgt__map_find(m, name, n, hash);
    pgt__key *key;
    if (i != PGT__NONE)
        return m->slots[i];
    key = (pgt__key *)calloc(1, size);
    if (key == NULL)
        return NULL;
    key->name = (char *)malloc(n);
    if (key->name == NULL) {
        free(key);
        return NULL;
    }
    memcpy(key->name, name, n);
    key->name_len = n;
    key->hash = hash;
    if (pgt__map_insert(m, key) < 0) {
        free(key->name);
        free(key);
        return NULL;
    }
    return key;
}

/* ------------------------------------------------------------------------------------------------
 * the FIFO of groups
 * ---------------------------------------------------------------------------------------------- */

#define PGT__IDLE_SLOTS 4       /* ring slots (with their buffers) kept while nothing is in flight */
#define PGT__IDLE_ARENA 8192    /* per-slot arena bytes kept while idle */
#define PGT__IDLE_STATEMENTS 16 /* per-slot statements kept while idle */

static inline pgt__group *
pgt__group_at(pgt_tracker *t, uint64_t seq)
{
    return &t->ring[(t->head + (size_t)(seq - t->head_seq)) & (t->ring_cap - 1)];
}

static inline pgt__group *
pgt__head(pgt_tracker *t)
{
    return t->size ? &t->ring[t->head] : NULL;
}

static inline pgt__stmt *
pgt__current_of(pgt__group *g)
{
    return g != NULL && g->cursor < g->n ? &g->stmts[g->cursor] : NULL;
}

/* tracker._current(): the statement the next response belongs to. */
static inline pgt__stmt *
pgt__current(pgt_tracker *t)
{
    return pgt__current_of(pgt__head(t));
}

/* A group that is done (or a ring slot about to be reused) lets go of its verdicts. */
static inline void
pgt__group_release(pgt__group *g)
{
    size_t i;
    for (i = 0; i < g->n; i++)
        pgt__verdict_set(&g->stmts[i].verdict, NULL);
    g->n = g->cursor = 0;
    pgt__verdict_set(&g->parse_verdict, NULL);
}

static inline void
pgt__slot_free(pgt__group *g)
{
    pgt__group_release(g);
    free(g->stmts);
    free(g->described);
    pgt_buf_free(&g->arena);
    memset(g, 0, sizeof *g);
}

static inline pgt__group *
pgt__push_group(pgt_tracker *t, int simple)
{
    pgt__group *g;
    if (t->size == t->ring_cap) {
        size_t cap = t->ring_cap ? t->ring_cap * 2 : 2, i;
        pgt__group *ring = (pgt__group *)calloc(cap, sizeof *ring);
        if (ring == NULL)
            return NULL;
        for (i = 0; i < t->ring_cap; i++) /* in FIFO order, idle slots (and their buffers) too */
            ring[i] = t->ring[(t->head + i) & (t->ring_cap - 1)];
        free(t->ring);
        t->ring = ring;
        t->ring_cap = cap;
        t->head = 0;
    }
    g = &t->ring[(t->head + t->size) & (t->ring_cap - 1)];
    pgt__group_release(g);
    g->arena.len = 0;
    if (pgt_buf_reserve(&g->arena, 256) < 0) /* never NULL while the group lives */
        return NULL;
    g->n = g->cursor = 0;
    g->parse_text.off = PGT__NONE;
    g->described_first = g->described_n = 0;
    g->simple = (unsigned char)simple;
    g->failed = 0;
    t->size++;
    return g;
}

static inline pgt__group *
pgt__pop_group(pgt_tracker *t)
{
    pgt__group *g = &t->ring[t->head];
    if (t->open_state == PGT__IN_FIFO && t->open_seq == t->head_seq)
        t->open_state = PGT__DETACHED;
    t->head = (t->head + 1) & (t->ring_cap - 1);
    t->head_seq++;
    t->size--;
    return g; /* valid until the next push */
}

/* Nothing in flight: release what a burst grew, keep small buffers for the next statement. */
static inline void
pgt__idle(pgt_tracker *t)
{
    size_t i;
    if (t->size != 0)
        return;
    if (t->ring_cap > PGT__IDLE_SLOTS) {
        for (i = 0; i < t->ring_cap; i++)
            pgt__slot_free(&t->ring[i]);
        free(t->ring);
        t->ring = NULL;
        t->ring_cap = t->head = 0;
        return;
    }
    for (i = 0; i < t->ring_cap; i++) {
        pgt__group *g = &t->ring[i];
        pgt__group_release(g);
        if (g->arena.cap > PGT__IDLE_ARENA)
            pgt_buf_free(&g->arena);
        if (g->cap > PGT__IDLE_STATEMENTS) {
            free(g->stmts);
            g->stmts = NULL;
            g->cap = 0;
        }
        if (g->described_cap > PGT__IDLE_STATEMENTS) {
            free(g->described);
            g->described = NULL;
            g->described_cap = 0;
        }
    }
}

static inline pgt__stmt *
pgt__add_stmt(pgt__group *g, double started, double started_mono)
{
    pgt__stmt *s;
    if (g->n == g->cap) {
        size_t cap = g->cap ? g->cap * 2 : 4;
        pgt__stmt *stmts = (pgt__stmt *)realloc(g->stmts, cap * sizeof *stmts);
        if (stmts == NULL)
            return NULL;
        g->stmts = stmts;
        g->cap = cap;
    }
    s = &g->stmts[g->n++];
    memset(s, 0, sizeof *s);
    s->started = started;
    s->started_mono = started_mono;
    s->tag.off = s->params.off = s->sqlstate.off = s->error.off = PGT__NONE;
    return s;
}

/* tracker._extended_group(): *out is NULL when the open group is detached (see open_state). */
static inline int
pgt__extended_group(pgt_tracker *t, pgt__group **out)
{
    if (t->open_state == PGT__NO_GROUP) {
        if (pgt__push_group(t, 0) == NULL)
            return -1;
        t->open_state = PGT__IN_FIFO;
        t->open_seq = t->head_seq + t->size - 1;
    }
    *out = t->open_state == PGT__IN_FIFO ? pgt__group_at(t, t->open_seq) : NULL;
    return 0;
}

/* Text appended to a group's arena (escaped for JSON unless raw). */
static inline int
pgt__arena_text(pgt__group *g, const unsigned char *p, size_t n, int raw, pgt__span *out)
{
    size_t off = g->arena.len;
    if (raw ? pgt_buf_append(&g->arena, p, n) : pgt__json_text(&g->arena, p, n, 0))
        return -1;
    out->off = off;
    out->len = g->arena.len - off;
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * construction
 * ---------------------------------------------------------------------------------------------- */

/* record_parameters: StatementTracker(record_parameters=...). first_seq: the rows the session wrote
 * already (SessionInfo.events): the next row gets seq first_seq + 1. template_version: the rows'
 * "tv" (SessionInfo._template_version; written by the caller beforehand). */
static inline pgt_tracker *
pgt_new(int record_parameters, int64_t first_seq, int template_version)
{
    pgt_tracker *t = (pgt_tracker *)calloc(1, sizeof *t);
    if (t == NULL)
        return NULL;
    t->record_parameters = record_parameters != 0;
    t->seq = first_seq;
    t->template_version = template_version;
    return t;
}

static inline void
pgt_free(pgt_tracker *t)
{
    size_t i;
    if (t == NULL)
        return;
    for (i = 0; i < t->ring_cap; i++)
        pgt__slot_free(&t->ring[i]);
    free(t->ring);
    for (i = 0; i < t->prepared.cap; i++)
        if (t->prepared.slots[i] != NULL) {
            pgt__prepared_clear((pgt__prepared *)t->prepared.slots[i]);
            free(t->prepared.slots[i]);
        }
    for (i = 0; i < t->portals.cap; i++)
        if (t->portals.slots[i] != NULL) {
            pgt__portal_clear((pgt__portal *)t->portals.slots[i]);
            free(t->portals.slots[i]);
        }
    free(t->prepared.slots);
    free(t->portals.slots);
    pgt__prepared_clear(&t->unnamed_prepared);
    pgt__portal_clear(&t->unnamed_portal);
    for (i = 0; i < 3; i++)
        pgt_buf_free(&t->scratch[i]);
    pgt_full_free(t->full);
    free(t);
}

/* Full rows from now on (the tracker owns `full`; NULL: compact rows again). */
static inline void
pgt_set_full(pgt_tracker *t, pgt_full *full)
{
    pgt_full_free(t->full);
    t->full = full;
}

/* A new grant wrote a new template (SessionInfo._write_template): later rows carry its version. */
static inline void
pgt_set_template_version(pgt_tracker *t, int template_version)
{
    t->template_version = template_version;
}

/* Groups awaiting answers, plus an open extended group detached by an early ReadyForQuery: 0 is a
 * quiescent point, where pgt_export describes all the state Python needs. */
static inline size_t
pgt_in_flight(const pgt_tracker *t)
{
    return t->size + (t->open_state == PGT__DETACHED);
}

typedef struct {
    uint64_t statements; /* completed: SessionInfo.statements */
    uint64_t errors;     /* of which sqlstate or error non-empty: metrics.STATEMENTS_ERROR */
    uint64_t skipped;    /* else skipped: metrics.STATEMENTS_SKIPPED */
    uint64_t ok;         /* else: metrics.STATEMENTS_OK */
    int64_t seq;         /* the last row's seq: SessionInfo.events */
} pgt_counters;

static inline void
pgt_get_counters(const pgt_tracker *t, pgt_counters *out)
{
    out->statements = t->statements;
    out->errors = t->errors;
    out->skipped = t->skipped;
    out->ok = t->ok;
    out->seq = t->seq;
}

/* The same counts one at a time. */
static inline uint64_t
pgt_statements_total(const pgt_tracker *t)
{
    return t->statements;
}

static inline uint64_t
pgt_statements_error(const pgt_tracker *t)
{
    return t->errors;
}

static inline uint64_t
pgt_statements_skipped(const pgt_tracker *t)
{
    return t->skipped;
}

static inline uint64_t
pgt_statements_ok(const pgt_tracker *t)
{
    return t->ok;
}

static inline int64_t
pgt_last_seq(const pgt_tracker *t)
{
    return t->seq;
}

/* DataRows counted since the last response that closed a command (tracker._since_tag): part of the
 * state a handover carries. */
static inline uint64_t
pgt_since_tag(const pgt_tracker *t)
{
    return t->since_tag;
}

/* ------------------------------------------------------------------------------------------------
 * evidence rows
 * ---------------------------------------------------------------------------------------------- */

#define PGT__SKIPPED_TEXT "not executed: an earlier statement in the pipeline failed"
#define PGT__ABANDONED_TEXT "the session ended before the statement completed"

/* The members both forms of a statement row share, `,"statement":…` to `,"seq":…` (reserved). */
static inline void
pgt__put_statement(pgt_buf *out, const pgt_tracker *t, const pgt__stmt *s, const char *arena, const char *duration,
                   size_t duration_len)
{
    PGT__LIT(out, ",\"statement\":\"");
    pgt__put(out, arena + s->text.off, s->text.len);
    PGT__LIT(out, "\",\"command_tag\":");
    if (s->tag.off == PGT__NONE) {
        PGT__LIT(out, "null");
    } else {
        out->data[out->len++] = '"';
        pgt__put(out, arena + s->tag.off, s->tag.len);
        out->data[out->len++] = '"';
    }
    PGT__LIT(out, ",\"rows\":");
    pgt__put_u64(out, s->rows);
    PGT__LIT(out, ",\"bytes\":");
    pgt__put_u64(out, s->bytes);
    PGT__LIT(out, ",\"duration_ms\":");
    pgt__put(out, duration, duration_len);
    PGT__LIT(out, ",\"seq\":");
    pgt__put_i64(out, t->seq);
}

/* The details object's members (reserved), each after `*sep` ('{' first, then ','). */
typedef struct {
    const pgt__stmt *s;
    const char *arena;
    int failed, has_sqlstate, has_error;
} pgt__details_of;

static inline void
pgt__member(pgt_buf *out, char *sep)
{
    out->data[out->len++] = *sep;
    *sep = ',';
}

static inline void
pgt__details_kind(pgt_buf *out, const pgt__details_of *d, char *sep)
{
    if (d->s->parse_kind) {
        pgt__member(out, sep);
        PGT__LIT(out, "\"kind\":\"parse\"");
    }
}

static inline void
pgt__details_parameters(pgt_buf *out, const pgt__details_of *d, char *sep)
{
    if (d->s->params.off != PGT__NONE) {
        pgt__member(out, sep);
        PGT__LIT(out, "\"parameters\":");
        pgt__put(out, d->arena + d->s->params.off, d->s->params.len);
    }
}

static inline void
pgt__details_skipped(pgt_buf *out, const pgt__details_of *d, char *sep)
{
    if (d->failed && d->s->skipped) {
        pgt__member(out, sep);
        PGT__LIT(out, "\"skipped\":\"" PGT__SKIPPED_TEXT "\"");
    }
}

static inline void
pgt__details_error(pgt_buf *out, const pgt__details_of *d, char *sep)
{
    if (d->failed && d->has_error && d->s->error.len) {
        pgt__member(out, sep);
        PGT__LIT(out, "\"error\":\"");
        pgt__put(out, d->arena + d->s->error.off, d->s->error.len);
        out->data[out->len++] = '"';
    }
}

static inline void
pgt__details_guardrail(pgt_buf *out, const pgt__details_of *d, char *sep)
{
    if (d->s->verdict != NULL && d->s->verdict->details_len) {
        pgt__member(out, sep);
        pgt__put(out, d->s->verdict->details, d->s->verdict->details_len);
    }
}

/* The details object: members in SessionInfo.statement_event's order (compact rows), or sorted (full
 * rows: the details column is the object as compact JSON with sorted keys, contract.details_text). */
static inline void
pgt__put_details(pgt_buf *out, const pgt__details_of *d, int sorted)
{
    char sep = '{';
    if (sorted) {
        pgt__details_error(out, d, &sep);
        pgt__details_guardrail(out, d, &sep);
        pgt__details_kind(out, d, &sep);
        pgt__details_parameters(out, d, &sep);
        pgt__details_skipped(out, d, &sep);
    } else {
        pgt__details_kind(out, d, &sep);
        pgt__details_parameters(out, d, &sep);
        pgt__details_skipped(out, d, &sep);
        pgt__details_error(out, d, &sep);
        pgt__details_guardrail(out, d, &sep);
    }
    out->data[out->len++] = '}';
}

/* The members a row sets when its statement has them: sqlstate and status_detail (a failure), rule
 * and approval_id (a verdict); with f (a full row), the template's members for those it has not
 * (reserved). */
static inline void
pgt__put_outcome(pgt_buf *out, const pgt__details_of *d, const pgt_full *f)
{
    const pgt__stmt *s = d->s;
    if (d->failed && d->has_sqlstate) {
        PGT__LIT(out, ",\"sqlstate\":\"");
        pgt__put(out, d->arena + s->sqlstate.off, s->sqlstate.len);
        out->data[out->len++] = '"';
    } else if (f != NULL) {
        pgt__put(out, f->absent[PGT__SQLSTATE], f->absent_len[PGT__SQLSTATE]);
    }
    if (d->failed && d->has_error) {
        PGT__LIT(out, ",\"status_detail\":\"");
        pgt__put(out, d->arena + s->error.off, s->error.len);
        out->data[out->len++] = '"';
    } else if (f != NULL) {
        pgt__put(out, f->absent[PGT__STATUS_DETAIL], f->absent_len[PGT__STATUS_DETAIL]);
    }
    if (s->verdict != NULL) {
        out->data[out->len++] = ',';
        pgt__put(out, s->verdict->row, s->verdict->row_len);
    } else if (f != NULL) {
        pgt__put(out, f->absent[PGT__RULE], f->absent_len[PGT__RULE]);
        pgt__put(out, f->absent[PGT__APPROVAL_ID], f->absent_len[PGT__APPROVAL_ID]);
    }
}

/* contract.session_event_id: the first 16 bytes of SHA-256("<session id>:<seq>"), in hex (reserved). */
static inline void
pgt__put_event_id(pgt_buf *out, const pgt_full *f, int64_t seq)
{
    char digits[24];
    unsigned char digest[32];
    sha256_t h;
    size_t i;
    pgt_buf seq_text = {digits, 0, sizeof digits};
    pgt__put_i64(&seq_text, seq);
    sha256_init(&h);
    sha256_update(&h, (const unsigned char *)f->session_id, f->session_id_len);
    sha256_update(&h, (const unsigned char *)":", 1);
    sha256_update(&h, (const unsigned char *)digits, seq_text.len);
    sha256_final(&h, digest);
    for (i = 0; i < 16; i++) {
        out->data[out->len++] = pgt__hex[digest[i] >> 4];
        out->data[out->len++] = pgt__hex[digest[i] & 15];
    }
}

/* contract.iso_millis: "YYYY-MM-DDTHH:MM:SS.mmm+00:00" (reserved). */
static inline void
pgt__put_iso(pgt_buf *out, pgt_full *f, int64_t ms)
{
    int64_t second = ms >= 0 ? ms / 1000 : -((-ms + 999) / 1000);
    int millis = (int)(ms - second * 1000);
    if (second != f->iso_second) {
        struct tm tm;
        time_t when = (time_t)second;
        if (gmtime_r(&when, &tm) == NULL)
            memset(&tm, 0, sizeof tm);
        snprintf(f->iso, sizeof f->iso, "%04d-%02d-%02dT%02d:%02d:%02d", tm.tm_year + 1900, tm.tm_mon + 1,
                 tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
        f->iso_second = second;
    }
    pgt__put(out, f->iso, strlen(f->iso));
    out->data[out->len++] = '.';
    out->data[out->len++] = (char)('0' + millis / 100);
    out->data[out->len++] = (char)('0' + millis / 10 % 10);
    out->data[out->len++] = (char)('0' + millis % 10);
    PGT__LIT(out, "+00:00");
}

/* The row as the shipper ships it but for the template's members (EventTemplate.expand of the compact
 * one): `time` first and `,"tv":N}` last, where the shipper reads them. */
static inline int
pgt__emit_full(pgt_tracker *t, const pgt__details_of *d, int details, int64_t time_ms, const char *duration,
               size_t duration_len, size_t need, pgt_buf *out)
{
    pgt_full *f = t->full;
    size_t i, extra = need + 160;
    if (details) {
        f->details.len = 0;
        if (pgt_buf_reserve(&f->details, need) < 0)
            return -1;
        pgt__put_details(&f->details, d, 1);
        extra += 2 * f->details.len;
    }
    for (i = 0; i < PGT_OPTIONAL_MEMBERS; i++)
        extra += f->absent_len[i];
    if (pgt_buf_reserve(out, extra) < 0)
        return -1;
    t->seq++;
    PGT__LIT(out, "{\"time\":");
    pgt__put_i64(out, time_ms);
    if (d->failed)
        PGT__LIT(out, ",\"activity_name\":\"query\",\"status\":\"Failure\"");
    else
        PGT__LIT(out, ",\"activity_name\":\"query\",\"status\":\"Success\"");
    pgt__put_statement(out, t, d->s, d->arena, duration, duration_len);
    PGT__LIT(out, ",\"event_id\":\"");
    pgt__put_event_id(out, f, t->seq);
    PGT__LIT(out, "\",\"time_iso\":\"");
    pgt__put_iso(out, f, time_ms);
    if (d->failed)
        PGT__LIT(out, "\",\"severity_id\":3");
    else
        PGT__LIT(out, "\",\"severity_id\":1");
    pgt__put_outcome(out, d, f);
    if (details) { /* the object as a JSON string: its text is JSON already, so only " and \ need escaping */
        PGT__LIT(out, ",\"details\":\"");
        for (i = 0; i < f->details.len; i++) {
            char c = f->details.data[i];
            if (c == '"' || c == '\\')
                out->data[out->len++] = '\\';
            out->data[out->len++] = c;
        }
        out->data[out->len++] = '"';
    } else {
        pgt__put(out, f->absent[PGT__DETAILS], f->absent_len[PGT__DETAILS]);
    }
    PGT__LIT(out, ",\"tv\":"); /* where the shipper puts the template's members */
    pgt__put_i64(out, t->template_version);
    PGT__LIT(out, "}\n");
    return 0;
}

/* SessionInfo.statement_event(statement), serialized (compact, or full with t->full), plus
 * statement_done's counts. */
static inline int
pgt__emit(pgt_tracker *t, const pgt__group *g, const pgt__stmt *s, pgt_buf *out)
{
    const char *arena = g->arena.data;
    char duration[48];
    size_t duration_len = 4, need;
    double ms = s->started * 1000;
    int64_t time_ms = ms >= 9.2e18 || ms <= -9.2e18 || ms != ms ? 0 : (int64_t)ms; /* int(): truncates */
    const pgt_verdict *verdict = s->verdict;
    int has_sqlstate = s->sqlstate.off != PGT__NONE, has_error = s->error.off != PGT__NONE;
    int failed = has_sqlstate || s->skipped || has_error;
    int details = s->parse_kind || s->params.off != PGT__NONE ||
                  (failed && (s->skipped || (has_error && s->error.len))) || (verdict != NULL && verdict->details_len);
    pgt__details_of d = {s, arena, failed, has_sqlstate, has_error};

    if (s->finished)
        duration_len = pgt__format_duration(duration, s->finished_mono, s->started_mono);
    else
        memcpy(duration, "null", 4);
    need = 512 + s->text.len + duration_len + (s->tag.off != PGT__NONE ? s->tag.len : 0) +
           (s->params.off != PGT__NONE ? s->params.len : 0) + (has_sqlstate ? s->sqlstate.len : 0) +
           (has_error ? 2 * s->error.len : 0) + (verdict != NULL ? verdict->row_len + verdict->details_len : 0);
    if (t->full != NULL) {
        if (pgt__emit_full(t, &d, details, time_ms, duration, duration_len, need, out) < 0)
            return -1;
    } else {
        if (pgt_buf_reserve(out, need) < 0)
            return -1;
        t->seq++;
        PGT__LIT(out, "{\"activity_name\":\"query\",\"status\":\"");
        if (failed)
            PGT__LIT(out, "Failure\",\"time\":");
        else
            PGT__LIT(out, "Success\",\"time\":");
        pgt__put_i64(out, time_ms);
        pgt__put_statement(out, t, s, arena, duration, duration_len);
        PGT__LIT(out, ",\"tv\":");
        pgt__put_i64(out, t->template_version);
        pgt__put_outcome(out, &d, NULL);
        if (details) {
            PGT__LIT(out, ",\"details\":");
            pgt__put_details(out, &d, 0);
        }
        PGT__LIT(out, "}\n");
    }
    t->statements++;
    if ((has_sqlstate && s->sqlstate.len) || (has_error && s->error.len))
        t->errors++;
    else if (s->skipped)
        t->skipped++;
    else
        t->ok++;
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * Bind bodies and parameters
 * ---------------------------------------------------------------------------------------------- */

typedef struct {
    const unsigned char *portal, *statement, *formats, *params;
    size_t portal_len, statement_len, nformats, nparams;
} pgt__bind;

static inline int
pgt__cstring(const unsigned char *body, size_t len, size_t *pos, const unsigned char **s, size_t *n)
{
    const unsigned char *nul = *pos < len ? (const unsigned char *)memchr(body + *pos, 0, len - *pos) : NULL;
    if (nul == NULL)
        return -1;
    *s = body + *pos;
    *n = (size_t)(nul - *s);
    *pos += *n + 1;
    return 0;
}

/* messages.parse_bind: what _parse_bind accepts (the fast path agrees wherever it answers):
 * negative counts read as zero, a parameter of negative length is NULL, trailing bytes ignored. */
static inline int
pgt__parse_bind(const unsigned char *body, size_t len, pgt__bind *b)
{
    size_t pos = 0, i;
    int count;
    if (pgt__cstring(body, len, &pos, &b->portal, &b->portal_len) ||
        pgt__cstring(body, len, &pos, &b->statement, &b->statement_len) || pos + 2 > len)
        return -1;
    count = pgt__i16(body + pos);
    pos += 2;
    b->nformats = count > 0 ? (size_t)count : 0;
    b->formats = body + pos;
    if (pos + 2 * b->nformats + 2 > len)
        return -1;
    pos += 2 * b->nformats;
    count = pgt__i16(body + pos);
    pos += 2;
    b->nparams = count > 0 ? (size_t)count : 0;
    b->params = body + pos;
    for (i = 0; i < b->nparams; i++) {
        int64_t size;
        if (pos + 4 > len)
            return -1;
        size = pgt__i32(body + pos);
        pos += 4;
        if (size > 0) {
            if ((uint64_t)size > len - pos)
                return -1;
            pos += (size_t)size;
        }
    }
    if (pos + 2 > len)
        return -1;
    count = pgt__i16(body + pos);
    pos += 2;
    if (count > 0 && 2 * (size_t)count > len - pos)
        return -1;
    if (b->nformats > 1 && b->nformats != b->nparams)
        return -1;
    return 0;
}

/* Bind.param_format(i) */
static inline int
pgt__param_format(const pgt__bind *b, size_t i)
{
    if (b->nformats == 0)
        return 0;
    return pgt__i16(b->formats + 2 * (b->nformats == 1 ? 0 : i));
}

/* The next parameter at *p: NULL (returns 0) or its value. */
static inline int
pgt__next_param(const unsigned char **p, const unsigned char **value, size_t *n)
{
    int64_t size = pgt__i32(*p);
    *p += 4;
    if (size < 0)
        return 0;
    *value = *p;
    *n = (size_t)size;
    *p += *n;
    return 1;
}

static inline int
pgt__int_type(uint32_t oid)
{
    return oid == 20 || oid == 21 || oid == 23;
}

static inline int
pgt__text_type(uint32_t oid)
{
    return oid == 25 || oid == 1042 || oid == 1043 || oid == 19 || oid == 114;
}

/* Whether _parameter's rendering of a Bind's parameters is beyond this port (any size of integer). */
static inline int
pgt__params_punt(const pgt__bind *b, const uint32_t *types, size_t ntypes)
{
    const unsigned char *p = b->params, *value;
    size_t i, n;
    for (i = 0; i < b->nparams; i++) {
        if (pgt__next_param(&p, &value, &n) && n > 8 && pgt__param_format(b, i) != 0 &&
            pgt__int_type(i < ntypes ? types[i] : 0))
            return 1;
    }
    return 0;
}

/* tracker._parameter() of a non-NULL value, as a JSON string (quotes included), appended to out.
 * Integers of more than 8 bytes must have been punted (pgt__params_punt). */
static inline int
pgt__render_param(pgt_buf *out, const unsigned char *v, size_t n, int fmt, uint32_t oid)
{
    size_t i;
    if (pgt_buf_reserve(out, 80) < 0)
        return -1;
    out->data[out->len++] = '"';
    if (fmt == 0 || (pgt__text_type(oid))) {
        if (pgt__json_text(out, v, n, PGT_MAX_PARAMETER_CHARS) || pgt_buf_reserve(out, 1) < 0)
            return -1;
    } else if (oid == 16) {
        if (n == 1 && v[0] == 1)
            PGT__LIT(out, "true");
        else
            PGT__LIT(out, "false");
    } else if (pgt__int_type(oid) && n <= 8) {
        uint64_t u = 0;
        for (i = 0; i < n; i++)
            u = (u << 8) | v[i];
        if (n > 0 && n < 8 && (v[0] & 0x80))
            u |= ~(uint64_t)0 << (8 * n); /* sign extension */
        if (n > 0 && (v[0] & 0x80)) {
            out->data[out->len++] = '-';
            pgt__put_u64(out, ~u + 1);
        } else {
            pgt__put_u64(out, u);
        }
    } else if ((oid == 700 && n == 4) || (oid == 701 && n == 8)) {
        double x;
        if (n == 4) {
            uint32_t bits = pgt__u32(v);
            float f;
            memcpy(&f, &bits, sizeof f);
            x = (double)f;
        } else {
            uint64_t bits = ((uint64_t)pgt__u32(v) << 32) | pgt__u32(v + 4);
            memcpy(&x, &bits, sizeof x);
        }
        out->len += pgt__format_double(out->data + out->len, x, 0);
    } else if (oid == 2950 && n == 16) {
        for (i = 0; i < 16; i++) {
            if (i == 4 || i == 6 || i == 8 || i == 10)
                out->data[out->len++] = '-';
            out->data[out->len++] = pgt__hex[v[i] >> 4];
            out->data[out->len++] = pgt__hex[v[i] & 15];
        }
    } else { /* "\\x" + value.hex(): 2 + 2n characters, truncated as any other text */
        size_t keep = n <= (PGT_MAX_PARAMETER_CHARS - 2) / 2 ? 2 * n : PGT_MAX_PARAMETER_CHARS - 2;
        if (pgt_buf_reserve(out, keep + 8) < 0)
            return -1;
        PGT__LIT(out, "\\\\x");
        for (i = 0; i < keep; i++)
            out->data[out->len++] = pgt__hex[i & 1 ? v[i / 2] & 15 : v[i / 2] >> 4];
        if (keep < 2 * n)
            PGT__LIT(out, "\xE2\x80\xA6");
    }
    out->data[out->len++] = '"';
    return 0;
}

/* The parameters of a Bind as the JSON list of the evidence. */
static inline int
pgt__render_params(pgt_buf *out, const pgt__bind *b, const uint32_t *types, size_t ntypes)
{
    const unsigned char *p = b->params, *value;
    size_t i, n;
    if (pgt_buf_reserve(out, 2) < 0)
        return -1;
    out->data[out->len++] = '[';
    for (i = 0; i < b->nparams; i++) {
        if (pgt_buf_reserve(out, 8) < 0)
            return -1;
        if (i)
            out->data[out->len++] = ',';
        if (!pgt__next_param(&p, &value, &n))
            PGT__LIT(out, "null");
        else if (pgt__render_param(out, value, n, pgt__param_format(b, i), i < ntypes ? types[i] : 0))
            return -1;
    }
    if (pgt_buf_reserve(out, 1) < 0)
        return -1;
    out->data[out->len++] = ']';
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * client → server
 * ---------------------------------------------------------------------------------------------- */

/* A name as Python's dicts key it: decoded with errors="replace" (in scratch[which] only when
 * ill-formed). */
static inline int
pgt__name(pgt_tracker *t, int which, const unsigned char *p, size_t n, const char **out, size_t *out_len)
{
    if (pgt__utf8_valid(p, n)) {
        *out = (const char *)p;
        *out_len = n;
        return 0;
    }
    t->scratch[which].len = 0;
    if (pgt__utf8_replace(&t->scratch[which], p, n) < 0)
        return -1;
    *out = t->scratch[which].data;
    *out_len = t->scratch[which].len;
    return 0;
}

static inline int
pgt__query(pgt_tracker *t, const unsigned char *body, size_t len, double now_wall, double now_mono,
           pgt_verdict *verdict)
{
    const unsigned char *nul = len ? (const unsigned char *)memchr(body, 0, len) : NULL;
    pgt__group *g;
    pgt__stmt *s;
    if (nul == NULL)
        return PGT_VIOLATION;
    if (pgt_might_hold_secret(body, len))
        return PGT_PUNT;
    g = pgt__push_group(t, 1);
    if (g == NULL || (s = pgt__add_stmt(g, now_wall, now_mono)) == NULL ||
        pgt__arena_text(g, body, (size_t)(nul - body), 0, &s->text))
        return PGT_NOMEM;
    s->verdict = pgt_verdict_ref(verdict);
    t->copy_state = PGT__IN_FIFO;
    t->copy_seq = t->head_seq + t->size - 1;
    t->copy_index = 0;
    return PGT_OK;
}

static inline int
pgt__parse(pgt_tracker *t, const unsigned char *body, size_t len, pgt_verdict *verdict)
{
    const unsigned char *name, *query;
    const char *key;
    size_t name_len, query_len, key_len, pos = 0, ntypes, i;
    pgt__prepared *entry;
    pgt__group *g;
    int count;
    if (pgt__cstring(body, len, &pos, &name, &name_len) || pgt__cstring(body, len, &pos, &query, &query_len) ||
        pos + 2 > len)
        return PGT_VIOLATION;
    count = pgt__i16(body + pos);
    pos += 2;
    ntypes = count > 0 ? (size_t)count : 0;
    if (4 * ntypes > len - pos)
        return PGT_VIOLATION;
    if (pgt_might_hold_secret(body, len))
        return PGT_PUNT;
    if (pgt__name(t, 0, name, name_len, &key, &key_len))
        return PGT_NOMEM;
    if (key_len == 0) {
        entry = &t->unnamed_prepared;
        t->has_unnamed_prepared = 1;
    } else if ((entry = (pgt__prepared *)pgt__map_entry(&t->prepared, key, key_len, sizeof *entry)) == NULL) {
        return PGT_NOMEM;
    }
    entry->query.len = 0;
    if (pgt__json_text(&entry->query, query, query_len, 0))
        return PGT_NOMEM;
    if (ntypes > entry->types_cap) {
        uint32_t *types = (uint32_t *)realloc(entry->types, ntypes * sizeof *types);
        if (types == NULL)
            return PGT_NOMEM;
        entry->types = types;
        entry->types_cap = ntypes;
    }
    for (i = 0; i < ntypes; i++)
        entry->types[i] = pgt__u32(body + pos + 4 * i);
    entry->ntypes = ntypes;
    pgt__verdict_set(&entry->verdict, verdict);
    if (pgt__extended_group(t, &g))
        return PGT_NOMEM;
    if (g != NULL) {
        if (pgt__arena_text(g, (const unsigned char *)entry->query.data, entry->query.len, 1, &g->parse_text))
            return PGT_NOMEM;
        pgt__verdict_set(&g->parse_verdict, verdict);
    }
    return PGT_OK;
}

static inline int
pgt__bind_message(pgt_tracker *t, const unsigned char *body, size_t len)
{
    pgt__bind b;
    memset(&b, 0, sizeof b);
    const char *portal, *statement;
    size_t portal_len, statement_len;
    pgt__portal *entry;
    pgt__group *g;
    if (pgt__parse_bind(body, len, &b))
        return PGT_VIOLATION;
    if (pgt_might_hold_secret(body, len))
        return PGT_PUNT;
    if (pgt__name(t, 0, b.portal, b.portal_len, &portal, &portal_len) ||
        pgt__name(t, 1, b.statement, b.statement_len, &statement, &statement_len))
        return PGT_NOMEM;
    if (portal_len == 0) {
        entry = &t->unnamed_portal;
        t->has_unnamed_portal = 1;
    } else if ((entry = (pgt__portal *)pgt__map_entry(&t->portals, portal, portal_len, sizeof *entry)) == NULL) {
        return PGT_NOMEM;
    }
    entry->statement.len = entry->bind.len = 0;
    if (pgt_buf_append(&entry->statement, statement, statement_len) || pgt_buf_append(&entry->bind, body, len) ||
        pgt__extended_group(t, &g))
        return PGT_NOMEM;
    return PGT_OK;
}

static inline int
pgt__execute(pgt_tracker *t, const unsigned char *body, size_t len, double now_wall, double now_mono)
{
    const unsigned char *nul = len ? (const unsigned char *)memchr(body, 0, len) : NULL;
    const char *name;
    size_t name_len;
    pgt__portal *portal;
    pgt__prepared *prepared;
    pgt__bind b;
    memset(&b, 0, sizeof b);
    pgt__group *g;
    pgt__stmt *s;
    int params;
    if (nul == NULL || (size_t)(nul - body) + 5 > len)
        return PGT_VIOLATION;
    if (t->open_state == PGT__DETACHED) { /* recorded where nobody will see it */
        t->copy_state = PGT__DETACHED;
        return PGT_OK;
    }
    if (pgt__name(t, 0, body, (size_t)(nul - body), &name, &name_len))
        return PGT_NOMEM;
    portal = pgt__portal_get(t, name, name_len);
    prepared = portal != NULL ? pgt__prepared_get(t, portal->statement.data, portal->statement.len)
                              : pgt__prepared_get(t, "", 0);
    params = t->record_parameters && portal != NULL;
    if (params) { /* a kept Bind body: parsed once already */
        pgt__parse_bind((const unsigned char *)portal->bind.data, portal->bind.len, &b);
        if (pgt__params_punt(&b, prepared ? prepared->types : NULL, prepared ? prepared->ntypes : 0))
            return PGT_PUNT;
    }
    if (pgt__extended_group(t, &g) || (s = pgt__add_stmt(g, now_wall, now_mono)) == NULL)
        return PGT_NOMEM;
    if (prepared != NULL) {
        if (pgt__arena_text(g, (const unsigned char *)prepared->query.data, prepared->query.len, 1, &s->text))
            return PGT_NOMEM;
    } else {
        static const char unknown[] = "<unknown prepared statement>";
        if (pgt__arena_text(g, (const unsigned char *)unknown, sizeof unknown - 1, 1, &s->text))
            return PGT_NOMEM;
    }
    s->verdict = pgt_verdict_ref(prepared != NULL ? prepared->verdict : NULL);
    if (params) {
        size_t off = g->arena.len;
        if (pgt__render_params(&g->arena, &b, prepared ? prepared->types : NULL, prepared ? prepared->ntypes : 0))
            return PGT_NOMEM;
        s->params.off = off;
        s->params.len = g->arena.len - off;
    }
    t->copy_state = PGT__IN_FIFO;
    t->copy_seq = t->open_seq;
    t->copy_index = g->n - 1;
    return PGT_OK;
}

/* Close and Describe: (kind, name). */
static inline int
pgt__close_or_describe(pgt_tracker *t, unsigned char type, const unsigned char *body, size_t len)
{
    const unsigned char *raw;
    const char *name;
    size_t raw_len, name_len, pos = 1, i;
    pgt__group *g;
    if (len < 1 || pgt__cstring(body, len, &pos, &raw, &raw_len))
        return PGT_VIOLATION;
    if (pgt__name(t, 0, raw, raw_len, &name, &name_len))
        return PGT_NOMEM;
    if (type == 'C') {
        if (body[0] == 'S') {
            if (name_len == 0) {
                t->has_unnamed_prepared = 0;
                pgt__verdict_set(&t->unnamed_prepared.verdict, NULL);
            } else if ((i = pgt__map_find(&t->prepared, name, name_len, pgt__hash(name, name_len))) != PGT__NONE) {
                pgt__prepared *entry = (pgt__prepared *)pgt__map_take(&t->prepared, i);
                pgt__prepared_clear(entry);
                free(entry);
            }
        } else if (name_len == 0) {
            t->has_unnamed_portal = 0;
        } else if ((i = pgt__map_find(&t->portals, name, name_len, pgt__hash(name, name_len))) != PGT__NONE) {
            pgt__portal *entry = (pgt__portal *)pgt__map_take(&t->portals, i);
            pgt__portal_clear(entry);
            free(entry);
        }
        return pgt__extended_group(t, &g) ? PGT_NOMEM : PGT_OK;
    }
    if (pgt__extended_group(t, &g))
        return PGT_NOMEM;
    if (body[0] == 'S' && g != NULL) { /* its ParameterDescription comes within the group */
        if (g->described_first + g->described_n == g->described_cap) {
            if (g->described_first > 0) {
                memmove(g->described, g->described + g->described_first, g->described_n * sizeof *g->described);
                g->described_first = 0;
            } else {
                size_t cap = g->described_cap ? g->described_cap * 2 : 4;
                pgt__span *described = (pgt__span *)realloc(g->described, cap * sizeof *described);
                if (described == NULL)
                    return PGT_NOMEM;
                g->described = described;
                g->described_cap = cap;
            }
        }
        if (pgt__arena_text(g, (const unsigned char *)name, name_len, 1,
                            &g->described[g->described_first + g->described_n]))
            return PGT_NOMEM;
        g->described_n++;
    }
    return PGT_OK;
}

/* One decoded client message (type byte, body without the 5-byte header), at time.time() and
 * time.monotonic() now, with the guardrails' verdict of a Query or Parse (NULL: None; the tracker
 * takes references of its own): StatementTracker.client_message(type, body, verdict). */
static inline int
pgt_client_message(pgt_tracker *t, unsigned char type, const unsigned char *body, size_t len, double now_wall,
                   double now_mono, pgt_verdict *verdict)
{
    pgt__group *g;
    int rc;
    switch (type) {
    case 'Q':
        rc = pgt__query(t, body, len, now_wall, now_mono, verdict);
        break;
    case 'P':
        rc = pgt__parse(t, body, len, verdict);
        break;
    case 'B':
        rc = pgt__bind_message(t, body, len);
        break;
    case 'E':
        rc = pgt__execute(t, body, len, now_wall, now_mono);
        break;
    case 'S':
        rc = pgt__extended_group(t, &g) ? PGT_NOMEM : PGT_OK;
        t->open_state = PGT__NO_GROUP;
        break;
    case 'C':
    case 'D':
        rc = pgt__close_or_describe(t, type, body, len);
        break;
    case 'F':
        return PGT_PUNT;
    default: /* Flush, Terminate, COPY messages: no bookkeeping */
        rc = PGT_OK;
    }
    if (rc == PGT_OK)
        t->wall_offset = now_wall - now_mono;
    return rc;
}

/* Client COPY data: the whole chunk's bytes, as Relay.from_client counts them. */
static inline void
pgt_client_copy_bytes(pgt_tracker *t, uint64_t count)
{
    if (t->copy_state == PGT__IN_FIFO)
        pgt__group_at(t, t->copy_seq)->stmts[t->copy_index].bytes += count;
}

/* ------------------------------------------------------------------------------------------------
 * server → client
 * ---------------------------------------------------------------------------------------------- */

/* DataRows (or CopyData) relayed since the last response that closed a command. */
static inline void
pgt_rows(pgt_tracker *t, uint64_t count)
{
    t->since_tag += count;
}

/* Server bytes that belong to the statement the next response belongs to. */
static inline void
pgt_server_bytes(pgt_tracker *t, uint64_t count)
{
    pgt__stmt *s = pgt__current(t);
    if (s != NULL)
        s->bytes += count;
}

/* A command's rows: its tag's count when it has one, else the rows relayed (the larger). */
static inline void
pgt__take_rows(pgt_tracker *t, pgt__stmt *s, uint64_t tagged)
{
    if (s != NULL)
        s->rows += t->since_tag > tagged ? t->since_tag : tagged;
    t->since_tag = 0;
}

static inline void
pgt__finish_current(pgt__group *g, double now)
{
    pgt__stmt *s = pgt__current_of(g);
    if (s != NULL) {
        s->finished_mono = now;
        s->finished = 1;
        g->cursor++;
    }
}

static inline int
pgt__command_complete(pgt_tracker *t, pgt__group *g, pgt__stmt *s, const unsigned char *body, size_t len,
                      double now)
{
    const unsigned char *nul = len ? (const unsigned char *)memchr(body, 0, len) : NULL;
    size_t n;
    uint64_t tagged = 0;
    if (nul == NULL)
        return PGT_VIOLATION;
    if (s == NULL) {
        t->since_tag = 0;
        return PGT_OK;
    }
    n = (size_t)(nul - body);
    pgt__rows_from_tag(body, n, &tagged);
    pgt__take_rows(t, s, tagged);
    if (g->simple && s->tag.off != PGT__NONE) { /* several statements in one Query: "tag; tag" */
        if (s->tag.off + s->tag.len != g->arena.len) { /* move it to the end, where it can grow */
            size_t off = g->arena.len;
            if (pgt_buf_reserve(&g->arena, s->tag.len))
                return PGT_NOMEM;
            pgt__put(&g->arena, g->arena.data + s->tag.off, s->tag.len);
            s->tag.off = off;
        }
        if (pgt_buf_append(&g->arena, "; ", 2) || pgt__json_text(&g->arena, body, n, 0))
            return PGT_NOMEM;
        s->tag.len = g->arena.len - s->tag.off;
        return PGT_OK;
    }
    if (pgt__arena_text(g, body, n, 0, &s->tag))
        return PGT_NOMEM;
    if (!g->simple)
        pgt__finish_current(g, now);
    return PGT_OK;
}

static inline int
pgt__error_response(pgt_tracker *t, pgt__group *g, pgt__stmt *s, const unsigned char *body, size_t len, double now)
{
    const unsigned char *code = NULL, *message = NULL, *value;
    size_t code_len = 0, message_len = 0, value_len, pos = 0, i;
    for (;;) { /* messages.error_fields: the last of each field wins */
        unsigned char field;
        if (pos >= len)
            return PGT_VIOLATION;
        field = body[pos++];
        if (field == 0)
            break;
        if (pgt__cstring(body, len, &pos, &value, &value_len))
            return PGT_VIOLATION;
        if (field == 'C') {
            code = value;
            code_len = value_len;
        } else if (field == 'M') {
            message = value;
            message_len = value_len;
        }
    }
    pgt__take_rows(t, s, 0);
    if (s == NULL && !g->simple && !g->failed) { /* it answers a Parse/Bind before any Execute */
        static const char unknown[] = "<unknown>";
        if ((s = pgt__add_stmt(g, now + t->wall_offset, now)) == NULL)
            return PGT_NOMEM;
        s->parse_kind = 1;
        s->verdict = pgt_verdict_ref(g->parse_verdict);
        if (g->parse_text.off != PGT__NONE && g->parse_text.len)
            s->text = g->parse_text;
        else if (pgt__arena_text(g, (const unsigned char *)unknown, sizeof unknown - 1, 1, &s->text))
            return PGT_NOMEM;
    }
    if (s == NULL)
        return PGT_OK;
    s->sqlstate.off = s->error.off = PGT__NONE;
    if ((code != NULL && pgt__arena_text(g, code, code_len, 0, &s->sqlstate)) ||
        (message != NULL && pgt__arena_text(g, message, message_len, 0, &s->error)))
        return PGT_NOMEM;
    if (!g->simple) {
        pgt__finish_current(g, now);
        for (i = g->cursor; i < g->n; i++)
            g->stmts[i].skipped = 1;
        g->failed = 1;
    }
    return PGT_OK;
}

static inline int
pgt__parameter_description(pgt_tracker *t, pgt__group *g, const unsigned char *body, size_t len)
{
    pgt__span name;
    pgt__prepared *entry;
    size_t ntypes, i;
    int count;
    if (g->described_n == 0)
        return PGT_OK;
    name = g->described[g->described_first++];
    g->described_n--;
    entry = pgt__prepared_get(t, g->arena.data + name.off, name.len);
    if (entry == NULL)
        return PGT_OK;
    if (len < 2)
        return PGT_VIOLATION;
    count = pgt__i16(body);
    ntypes = count > 0 ? (size_t)count : 0;
    if (4 * ntypes > len - 2)
        return PGT_VIOLATION;
    if (ntypes > entry->types_cap) {
        uint32_t *types = (uint32_t *)realloc(entry->types, ntypes * sizeof *types);
        if (types == NULL)
            return PGT_NOMEM;
        entry->types = types;
        entry->types_cap = ntypes;
    }
    for (i = 0; i < ntypes; i++)
        entry->types[i] = pgt__u32(body + 2 + 4 * i);
    entry->ntypes = ntypes;
    return PGT_OK;
}

static inline int
pgt__ready_for_query(pgt_tracker *t, pgt__stmt *s, double now, pgt_buf *events)
{
    pgt__group *g;
    size_t i;
    pgt__take_rows(t, s, 0);
    g = pgt__pop_group(t);
    if (s != NULL) { /* statements still open: a simple query's, or skipped after an error */
        for (i = g->cursor; i < g->n; i++) {
            pgt__stmt *p = &g->stmts[i];
            if (!g->simple && !p->finished && p->sqlstate.off == PGT__NONE)
                p->skipped = p->skipped || g->failed;
            if (!p->finished || p->finished_mono == 0) { /* finished_mono or now */
                p->finished_mono = now;
                p->finished = 1;
            }
        }
    }
    t->copy_state = PGT__NO_GROUP;
    for (i = 0; i < g->n; i++)
        if (pgt__emit(t, g, &g->stmts[i], events))
            return PGT_NOMEM;
    pgt__group_release(g);
    pgt__idle(t);
    return PGT_OK;
}

/* One of the server messages the bookkeeping decodes (CommandComplete, ErrorResponse,
 * ReadyForQuery, EmptyQueryResponse, PortalSuspended, ParameterDescription: C E Z I s t) at
 * time.monotonic() now; any other type is ignored. StatementTracker.server_message. */
static inline int
pgt_server_message(pgt_tracker *t, unsigned char type, const unsigned char *body, size_t len, double now_mono,
                   pgt_buf *events)
{
    pgt__group *g = pgt__head(t);
    pgt__stmt *s;
    if (g == NULL)
        return PGT_OK;
    s = pgt__current_of(g);
    switch (type) {
    case 'C':
        return pgt__command_complete(t, g, s, body, len, now_mono);
    case 'I':
    case 's':
        pgt__take_rows(t, s, 0);
        if (s != NULL && !g->simple) {
            static const char suspended[] = "PORTAL SUSPENDED";
            if (pgt__arena_text(g, (const unsigned char *)suspended, type == 'I' ? 0 : sizeof suspended - 1, 1,
                                &s->tag))
                return PGT_NOMEM;
            pgt__finish_current(g, now_mono);
        } else if (s != NULL && type == 'I' && s->tag.off == PGT__NONE) { /* tag or "" */
            s->tag.off = g->arena.len;
            s->tag.len = 0;
        }
        return PGT_OK;
    case 'E':
        return pgt__error_response(t, g, s, body, len, now_mono);
    case 't':
        return pgt__parameter_description(t, g, body, len);
    case 'Z':
        return pgt__ready_for_query(t, s, now_mono, events);
    default:
        return PGT_OK;
    }
}

static inline int
pgt__server_decoded(uint32_t type)
{
    return type == 'C' || type == 'E' || type == 'Z' || type == 'I' || type == 's' || type == 't';
}

/* StatementTracker.server_frames for one read: chunk[:end] holds whole frames, `frames` the ones
 * scan_frames reported (DataRow/CopyData skipped, so only counted), `trailing` the frames skipped
 * after the last one. Bytes up to and including a decoded frame go to the statement it answers.
 * A frame outside chunk[:end] or before the previous one is a PGT_VIOLATION (a caller's bug). */
static inline int
pgt_server_frames(pgt_tracker *t, const unsigned char *chunk, const pgt_frame *frames, size_t nframes, uint64_t end,
                  uint64_t trailing, double now_mono, pgt_buf *events)
{
    uint64_t pos = 0, rows = 0;
    size_t i;
    for (i = 0; i < nframes; i++) {
        const pgt_frame *f = &frames[i];
        rows += f->skipped;
        if (pgt__server_decoded(f->type)) {
            uint64_t frame_end = (uint64_t)f->offset + f->size;
            pgt__stmt *s;
            int rc;
            if (f->size < 5 || frame_end > end || frame_end < pos)
                return PGT_VIOLATION;
            if (rows) {
                t->since_tag += rows;
                rows = 0;
            }
            s = pgt__current(t);
            if (s != NULL)
                s->bytes += frame_end - pos;
            pos = frame_end;
            rc = pgt_server_message(t, (unsigned char)f->type, chunk + f->offset + 5, f->size - 5, now_mono, events);
            if (rc != PGT_OK)
                return rc;
        }
    }
    rows += trailing;
    t->since_tag += rows;
    if (end > pos)
        pgt_server_bytes(t, end - pos);
    return PGT_OK;
}

/* The session ended with statements in flight: they are evidence too (StatementTracker.abandon). */
static inline void
pgt_abandon(pgt_tracker *t, double now_mono, pgt_buf *events)
{
    static const char abandoned[] = PGT__ABANDONED_TEXT;
    size_t i;
    if (t->size)
        pgt__take_rows(t, pgt__current(t), 0);
    while (t->size) {
        pgt__group *g = pgt__pop_group(t);
        for (i = g->cursor; i < g->n; i++) {
            pgt__stmt *s = &g->stmts[i];
            if (s->sqlstate.off == PGT__NONE && !s->skipped &&
                pgt__arena_text(g, (const unsigned char *)abandoned, sizeof abandoned - 1, 1, &s->error))
                s->error.off = PGT__NONE; /* out of memory: the row says less */
            if (!s->finished || s->finished_mono == 0) {
                s->finished_mono = now_mono;
                s->finished = 1;
            }
        }
        for (i = g->cursor; i < g->n; i++)
            pgt__emit(t, g, &g->stmts[i], events);
        pgt__group_release(g);
    }
    t->copy_state = PGT__NO_GROUP;
    pgt__idle(t);
}

/* ------------------------------------------------------------------------------------------------
 * handing a session back to Python at a quiescent point (pgt_in_flight() == 0)
 * ---------------------------------------------------------------------------------------------- */

typedef struct { /* StatementTracker.prepared[name] = m.Parse(name, query, param_types) */
    const char *name, *query; /* UTF-8 as Python decoded them */
    size_t name_len, query_len;
    const uint32_t *param_types;
    size_t nparam_types;
    const pgt_verdict *verdict; /* StatementTracker.judged[name] = (query, verdict) */
} pgt_prepared_info;

typedef struct { /* StatementTracker.portals[name] = (statement, m.parse_bind(bind)) */
    const char *name, *statement;
    size_t name_len, statement_len;
    const unsigned char *bind; /* the Bind body as the client sent it */
    size_t bind_len;
} pgt_portal_info;

static inline size_t
pgt_prepared_count(const pgt_tracker *t)
{
    return t->prepared.count + (t->has_unnamed_prepared != 0);
}

static inline size_t
pgt_portal_count(const pgt_tracker *t)
{
    return t->portals.count + (t->has_unnamed_portal != 0);
}

static inline int
pgt__export_prepared(pgt_tracker *t, const pgt__prepared *p, int (*cb)(void *, const pgt_prepared_info *), void *arg)
{
    pgt_prepared_info info;
    t->scratch[2].len = 0;
    if (pgt__json_unescape(&t->scratch[2], p->query.data, p->query.len))
        return PGT_NOMEM;
    info.name = p->key.name_len ? p->key.name : "";
    info.name_len = p->key.name_len;
    info.query = t->scratch[2].data ? t->scratch[2].data : "";
    info.query_len = t->scratch[2].len;
    info.param_types = p->types;
    info.nparam_types = p->ntypes;
    info.verdict = p->verdict;
    return cb(arg, &info);
}

static inline int
pgt__export_portal(const pgt__portal *p, int (*cb)(void *, const pgt_portal_info *), void *arg)
{
    pgt_portal_info info;
    info.name = p->key.name_len ? p->key.name : "";
    info.name_len = p->key.name_len;
    info.statement = p->statement.data ? p->statement.data : "";
    info.statement_len = p->statement.len;
    info.bind = (const unsigned char *)p->bind.data;
    info.bind_len = p->bind.len;
    return cb(arg, &info);
}

/* Calls on_prepared for each prepared statement, then on_portal for each portal (either may be
 * NULL); stops at the first nonzero return and returns it (PGT_NOMEM: out of memory). Python's
 * tracker.judged[name] is (query, the verdict's doc or None) for each prepared statement. Strings
 * are valid until the next call on the tracker. */
static inline int
pgt_export(pgt_tracker *t, int (*on_prepared)(void *, const pgt_prepared_info *),
           int (*on_portal)(void *, const pgt_portal_info *), void *arg)
{
    size_t i;
    int rc;
    if (on_prepared != NULL) {
        if (t->has_unnamed_prepared && (rc = pgt__export_prepared(t, &t->unnamed_prepared, on_prepared, arg)))
            return rc;
        for (i = 0; i < t->prepared.cap; i++)
            if (t->prepared.slots[i] != NULL &&
                (rc = pgt__export_prepared(t, (const pgt__prepared *)t->prepared.slots[i], on_prepared, arg)))
                return rc;
    }
    if (on_portal != NULL) {
        if (t->has_unnamed_portal && (rc = pgt__export_portal(&t->unnamed_portal, on_portal, arg)))
            return rc;
        for (i = 0; i < t->portals.cap; i++)
            if (t->portals.slots[i] != NULL &&
                (rc = pgt__export_portal((const pgt__portal *)t->portals.slots[i], on_portal, arg)))
                return rc;
    }
    return 0;
}

#endif /* PROCTOR_PGTRACK_H */
