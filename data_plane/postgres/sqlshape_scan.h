/* The statement-shape lexer shared by _sqlshape.c (the Python-facing twin of sqlshape._statement_shape_py,
 * whose docstring states the rules) and _fastrelay.c (guardrail verdicts cached by shape on the C data
 * path). Include after <Python.h> (it uses Py_ssize_t only); call init_byte_kinds() once. */
#ifndef PROCTOR_SQLSHAPE_SCAN_H
#define PROCTOR_SQLSHAPE_SCAN_H
#include <string.h>


#define K_IDENT_START 0x01u /* [A-Za-z_\x80-\xff] */
#define K_DIGIT 0x02u
#define K_DOLLAR 0x04u
#define K_SPACE 0x08u /* [ \t\n\r\f\v] */
#define K_PUNCT 0x10u /* operator and punctuation bytes copied verbatim ('?' is not one: it is the placeholder) */
#define K_IDENT_CONT (K_IDENT_START | K_DIGIT | K_DOLLAR)
#define K_DOLQ_CONT (K_IDENT_START | K_DIGIT)

static unsigned char byte_kind[256];

enum quoting { STANDARD, ESCAPE, BITS }; /* scan.l's xq, xe and xb/xh states */

typedef struct {
    char *buf;
    Py_ssize_t len;
    Py_ssize_t cap;
    int space; /* whitespace or a comment was seen since the last token */
} Shape;

static void
init_byte_kinds(void)
{
    const char *punct = ",()[].;:~!@#^&|`+-*/%<>=";
    int c;

    for (c = 'A'; c <= 'Z'; c++)
        byte_kind[c] = K_IDENT_START;
    for (c = 'a'; c <= 'z'; c++)
        byte_kind[c] = K_IDENT_START;
    for (c = 0x80; c <= 0xff; c++)
        byte_kind[c] = K_IDENT_START;
    byte_kind['_'] = K_IDENT_START;
    for (c = '0'; c <= '9'; c++)
        byte_kind[c] = K_DIGIT;
    byte_kind['$'] = K_DOLLAR;
    byte_kind[' '] = byte_kind['\t'] = byte_kind['\n'] = byte_kind['\r'] = byte_kind['\f'] = byte_kind['\v'] = K_SPACE;
    for (; *punct; punct++)
        byte_kind[(unsigned char)*punct] = K_PUNCT;
}

/* Appends a token, preceded by one space if whitespace or a comment separated it from the previous one.
 * Returns -1 if it would not fit; the buffer holds 2n + 16 bytes; a shape needs at most 1.5n ('' -> '?'). */
static int
emit(Shape *shape, const char *token, Py_ssize_t size)
{
    int sep = shape->space && shape->len > 0;

    if (size > shape->cap - shape->len - sep)
        return -1;
    if (sep)
        shape->buf[shape->len++] = ' ';
    shape->space = 0;
    memcpy(shape->buf + shape->len, token, (size_t)size);
    shape->len += size;
    return 0;
}

static int
emit_prefixed_string(Shape *shape, unsigned char prefix)
{
    char token[4] = {(char)prefix, '\'', '?', '\''};
    return emit(shape, token, 4);
}

/* Quoting of the string after a one-letter word that is a literal prefix (E'', B'', X'', N''), or -1. */
static int
prefix_quoting(unsigned char c)
{
    switch (c) {
    case 'e': case 'E':
        return ESCAPE;
    case 'b': case 'B': case 'x': case 'X':
        return BITS;
    case 'n': case 'N':
        return STANDARD; /* NCHAR followed by a standard string */
    default:
        return -1;
    }
}

static Py_ssize_t
line_end(const unsigned char *s, Py_ssize_t n, Py_ssize_t pos)
{
    while (pos < n && s[pos] != '\n' && s[pos] != '\r')
        pos++;
    return pos;
}

/* Index just past the comment whose opening slash-star ends at pos; comments nest. -1: unterminated. */
static Py_ssize_t
block_comment_end(const unsigned char *s, Py_ssize_t n, Py_ssize_t pos)
{
    Py_ssize_t depth = 1;

    while (pos + 1 < n) {
        if (s[pos] == '/' && s[pos + 1] == '*') {
            depth++;
            pos += 2;
        } else if (s[pos] == '*' && s[pos + 1] == '/') {
            pos += 2;
            if (--depth == 0)
                return pos;
        } else {
            pos++;
        }
    }
    return -1;
}

/* Index of the quote continuing the string that closed just before pos, or -1: scan.l's
 * {quotecontinue}, whitespace holding a newline (-- comments count, block comments do not). */
static Py_ssize_t
continuation(const unsigned char *s, Py_ssize_t n, Py_ssize_t pos)
{
    while (pos < n) {
        unsigned char c = s[pos];
        if (c == ' ' || c == '\t' || c == '\f' || c == '\v')
            pos++;
        else if (c == '-' && pos + 1 < n && s[pos + 1] == '-')
            pos = line_end(s, n, pos);
        else
            break;
    }
    if (pos >= n || (s[pos] != '\n' && s[pos] != '\r'))
        return -1;
    pos++;
    while (pos < n) {
        if (byte_kind[s[pos]] & K_SPACE) {
            pos++;
        } else if (s[pos] == '-' && pos + 1 < n && s[pos + 1] == '-') {
            pos = line_end(s, n, pos);
            if (pos >= n) /* a -- comment continues a string only when a newline ends it */
                return -1;
        } else {
            break;
        }
    }
    return (pos < n && s[pos] == '\'') ? pos : -1;
}

/* Index just past the string literal whose opening quote is at `quote`, continuations included; -1: None. */
static Py_ssize_t
quoted_end(const unsigned char *s, Py_ssize_t n, Py_ssize_t quote, enum quoting mode)
{
    Py_ssize_t pos = quote + 1;

    for (;;) {
        Py_ssize_t following;

        while (pos < n && s[pos] != '\'') {
            if (s[pos] == '\\' && mode == STANDARD)
                return -1; /* where this string ends depends on standard_conforming_strings */
            if (s[pos] == '\\' && mode == ESCAPE) {
                unsigned char escaped;
                if (pos + 1 >= n)
                    return -1;
                escaped = s[pos + 1];
                /* escapes whose value PostgreSQL checks while scanning: a bad one fails the statement */
                if (escaped >= 0x80 || (escaped >= '0' && escaped <= '7') || escaped == 'u' || escaped == 'U'
                    || escaped == 'x')
                    return -1;
                pos += 2;
                continue;
            }
            pos++;
        }
        if (pos >= n)
            return -1;
        if (pos + 1 < n && s[pos + 1] == '\'') {
            if (mode == BITS)
                return -1; /* B'01''10' is two literals in a row; nothing sends that */
            pos += 2;
            continue;
        }
        following = continuation(s, n, pos + 1);
        if (following < 0)
            return pos + 1;
        pos = following + 1;
    }
}

static Py_ssize_t
quoted_ident_end(const unsigned char *s, Py_ssize_t n, Py_ssize_t quote)
{
    Py_ssize_t pos = quote + 1;

    for (;;) {
        while (pos < n && s[pos] != '"')
            pos++;
        if (pos >= n)
            return -1;
        if (pos + 1 < n && s[pos + 1] == '"') {
            pos += 2;
            continue;
        }
        return pos > quote + 1 ? pos + 1 : -1; /* "" is a zero-length identifier: an error */
    }
}

static int
is_digit_of(unsigned char c, int base)
{
    if (base == 16)
        return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
    return c >= '0' && c < '0' + base;
}

/* Index just past {digit}(_?{digit})* where s[pos] is a digit of the base. */
static Py_ssize_t
digits_end(const unsigned char *s, Py_ssize_t n, Py_ssize_t pos, int base)
{
    pos++;
    for (;;) {
        if (pos < n && is_digit_of(s[pos], base))
            pos++;
        else if (pos + 1 < n && s[pos] == '_' && is_digit_of(s[pos + 1], base))
            pos += 2;
        else
            return pos;
    }
}

/* Index just past the number starting at pos (a digit, or a dot before a digit): scan.l's decinteger,
 * hexinteger, octinteger, bininteger, numeric and real. */
static Py_ssize_t
number_end(const unsigned char *s, Py_ssize_t n, Py_ssize_t pos)
{
    if (s[pos] == '0' && pos + 1 < n) {
        unsigned char radix = s[pos + 1];
        int base = (radix == 'x' || radix == 'X') ? 16 : (radix == 'o' || radix == 'O') ? 8
                 : (radix == 'b' || radix == 'B') ? 2 : 0;
        if (base) {
            Py_ssize_t first = pos + 2;
            if (first < n && s[first] == '_')
                first++;
            if (first < n && is_digit_of(s[first], base))
                return digits_end(s, n, first, base);
        }
    }
    if (s[pos] == '.') {
        pos = digits_end(s, n, pos + 1, 10);
    } else {
        pos = digits_end(s, n, pos, 10);
        if (pos < n && s[pos] == '.') {
            pos++;
            if (pos < n && (byte_kind[s[pos]] & K_DIGIT))
                pos = digits_end(s, n, pos, 10);
        }
    }
    if (pos < n && (s[pos] == 'e' || s[pos] == 'E')) {
        Py_ssize_t exponent = pos + 1;
        if (exponent < n && (s[exponent] == '+' || s[exponent] == '-'))
            exponent++;
        if (exponent < n && (byte_kind[s[exponent]] & K_DIGIT))
            pos = digits_end(s, n, exponent, 10);
    }
    return pos;
}

/* Position of needle in s[from:n], or -1. */
static Py_ssize_t
find(const unsigned char *s, Py_ssize_t n, Py_ssize_t from, const unsigned char *needle, Py_ssize_t size)
{
    while (n - from >= size) {
        const unsigned char *hit = memchr(s + from, needle[0], (size_t)(n - from - size + 1));
        if (hit == NULL)
            return -1;
        from = hit - s;
        if (memcmp(hit, needle, (size_t)size) == 0)
            return from;
        from++;
    }
    return -1;
}

/* 1: the shape is in `shape`; 0: None; -1: the buffer was too small (a bug: the caller returns None). */
static int
scan(const unsigned char *s, Py_ssize_t n, Shape *shape)
{
    Py_ssize_t pos = 0;

    while (pos < n) {
        unsigned char c = s[pos];
        unsigned kind = byte_kind[c];
        Py_ssize_t end;

        if (kind & K_SPACE) {
            shape->space = 1;
            pos++;
        } else if (c == '-' && pos + 1 < n && s[pos + 1] == '-') {
            shape->space = 1;
            pos = line_end(s, n, pos);
        } else if (c == '/' && pos + 1 < n && s[pos + 1] == '*') {
            pos = block_comment_end(s, n, pos + 2);
            if (pos < 0)
                return 0;
            shape->space = 1;
        } else if (kind & K_IDENT_START) {
            end = pos + 1;
            while (end < n && (byte_kind[s[end]] & K_IDENT_CONT))
                end++;
            if (end - pos == 1 && end < n && s[end] == '\'' && prefix_quoting(c) >= 0) {
                enum quoting mode = (enum quoting)prefix_quoting(c);
                end = quoted_end(s, n, end, mode);
                if (end < 0)
                    return 0;
                if ((mode == ESCAPE ? emit(shape, "'?'", 3) : emit_prefixed_string(shape, c)) < 0)
                    return -1;
                pos = end;
                continue;
            }
            if (end - pos == 1 && (c == 'u' || c == 'U') && end + 1 < n && s[end] == '&'
                && (s[end + 1] == '\'' || s[end + 1] == '"'))
                return 0;
            if (emit(shape, (const char *)s + pos, end - pos) < 0)
                return -1;
            pos = end;
        } else if ((kind & K_DIGIT) || (c == '.' && pos + 1 < n && (byte_kind[s[pos + 1]] & K_DIGIT))) {
            if (c == '.' && pos > 0) {
                unsigned char before = s[pos - 1];
                if ((byte_kind[before] & K_IDENT_CONT) || before == ')' || before == ']' || before == '"'
                    || before == '\'' || before == '.')
                    return 0;
            }
            end = number_end(s, n, pos);
            if (end < n && ((byte_kind[s[end]] & K_IDENT_CONT) || s[end] == '.'))
                return 0;
            if (emit(shape, "?", 1) < 0)
                return -1;
            pos = end;
        } else if (c == '$' && pos + 1 < n && (byte_kind[s[pos + 1]] & K_DIGIT)) {
            end = pos + 1;
            while (end < n && (byte_kind[s[end]] & K_DIGIT))
                end++;
            if (end < n && (byte_kind[s[end]] & K_IDENT_CONT))
                return 0;
            if (emit(shape, (const char *)s + pos, end - pos) < 0)
                return -1;
            pos = end;
        } else if (c == '$') {
            Py_ssize_t close, size;
            end = pos + 1;
            if (end < n && (byte_kind[s[end]] & K_IDENT_START)) {
                end++;
                while (end < n && (byte_kind[s[end]] & K_DOLQ_CONT))
                    end++;
            }
            if (end >= n || s[end] != '$')
                return 0;
            size = end + 1 - pos;
            close = find(s, n, end + 1, s + pos, size);
            if (close < 0)
                return 0;
            if (emit(shape, "'?'", 3) < 0)
                return -1;
            pos = close + size;
        } else if (c == '\'') {
            end = quoted_end(s, n, pos, STANDARD);
            if (end < 0)
                return 0;
            if (emit(shape, "'?'", 3) < 0)
                return -1;
            pos = end;
        } else if (c == '"') {
            end = quoted_ident_end(s, n, pos);
            if (end < 0)
                return 0;
            if (emit(shape, (const char *)s + pos, end - pos) < 0)
                return -1;
            pos = end;
        } else if (kind & K_PUNCT) {
            if (emit(shape, (const char *)s + pos, 1) < 0)
                return -1;
            pos++;
        } else {
            return 0; /* backslash, '?', braces, control characters */
        }
    }
    return 1;
}

#endif
