/* The ABEJA tokenizer's per-character loops in C (an optional speed-up of abeja.py).

   It owns exactly the steps that are slow in Python, and nothing else:
   - Segmenter: walking normalised text and choosing one token per position (smallest id among the vocabulary
     prefixes of the 3-character window; at '<' the longest '<...>' entry of three or more characters wins
     outright; characters with no entry become <KIGOU>, <U2000U2BFF> or UTF-8 byte tokens). abeja.py's
     pure-Python `_segment` is the specification this must match id for id.
       Segmenter(entries, kigou_id, u2e_id, byte_ids, error), entries a dict {spelling: id};
       Segmenter.encode(text) -> list[int]. An id of -1 means "no such token": needing one raises `error`.
   - CharSet: which of a fixed set of characters occur in a text, the emoji pass's filter; it behaves like
     frozenset.intersection(text).
       CharSet(chars).intersection(text) -> set[str]
   Text normalisation, emoji replacement and clean_text stay in Python, shared by both paths. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>

/* ---- short table: spellings of 1..3 code points, keyed by the packed code points ----------------------
   Each position of the key holds code point + 1 (so NUL is representable and 0 means "absent"); 21 bits
   suffice because code points are < 0x110000. Proper prefixes of spellings are stored too (id -1) with the
   `extends` flag, so the scan can stop as soon as no longer spelling is possible. */

typedef struct {
    uint64_t key; /* 0 = empty slot */
    int32_t id;   /* -1: only a prefix of longer spellings */
    int32_t extends;
} ShortSlot;

typedef struct {
    ShortSlot *slots;
    uint64_t mask;
} ShortTable;

static inline uint64_t pack1(uint32_t a) { return (uint64_t)a + 1; }
static inline uint64_t pack2(uint32_t a, uint32_t b) { return pack1(a) | ((uint64_t)b + 1) << 21; }
static inline uint64_t pack3(uint32_t a, uint32_t b, uint32_t c) { return pack2(a, b) | ((uint64_t)c + 1) << 42; }

static inline uint64_t mix(uint64_t x) {
    x ^= x >> 31;
    x *= 0x9E3779B97F4A7C15ull;
    return x ^ (x >> 29);
}

static ShortSlot *short_find(const ShortTable *t, uint64_t key) {
    for (uint64_t i = mix(key) & t->mask;; i = (i + 1) & t->mask) {
        ShortSlot *s = &t->slots[i];
        if (s->key == key) return s;
        if (s->key == 0) return NULL;
    }
}

static ShortSlot *short_insert(ShortTable *t, uint64_t key) {
    for (uint64_t i = mix(key) & t->mask;; i = (i + 1) & t->mask) {
        ShortSlot *s = &t->slots[i];
        if (s->key == key) return s;
        if (s->key == 0) {
            s->key = key;
            s->id = -1;
            s->extends = 0;
            return s;
        }
    }
}

/* ---- long table: '<'-spellings of 3+ code points, keyed by a hash of the code points --------------------- */

typedef struct {
    uint64_t hash; /* 0 = empty slot */
    Py_UCS4 *cps;
    Py_ssize_t len;
    int32_t id;
} LongSlot;

typedef struct {
    LongSlot *slots;
    uint64_t mask;
    Py_ssize_t maxlen;    /* longest '<'-spelling */
    unsigned char *has_len; /* has_len[L]: some '<'-spelling has L code points */
} LongTable;

/* A hash that extends one code point at a time, so all prefixes of a window cost one pass; never 0. */
static inline uint64_t hash_step(uint64_t h, Py_UCS4 c) { return (h ^ c) * 0x100000001B3ull; }
static inline uint64_t hash_final(uint64_t h) { return mix(h) | 1; }

/* ---- the segmenter object ----------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    ShortTable shorts;
    LongTable longs;
    int32_t kigou_id, u2e_id, byte_ids[256];
    PyObject **id_objects; /* cached Python ints for every id, so building the result list allocates nothing */
    int32_t id_count;
    PyObject *error;
} Segmenter;

static void Segmenter_dealloc(Segmenter *self) {
    PyMem_Free(self->shorts.slots);
    if (self->longs.slots) {
        for (uint64_t i = 0; i <= self->longs.mask; i++) PyMem_Free(self->longs.slots[i].cps);
        PyMem_Free(self->longs.slots);
    }
    PyMem_Free(self->longs.has_len);
    if (self->id_objects) {
        for (int32_t i = 0; i < self->id_count; i++) Py_XDECREF(self->id_objects[i]);
        PyMem_Free(self->id_objects);
    }
    Py_XDECREF(self->error);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static uint64_t table_size(Py_ssize_t n) {
    uint64_t size = 16;
    while (size < (uint64_t)n * 3) size <<= 1; /* load factor below 1/3 keeps probe chains short */
    return size;
}

static int check_id(long id, int32_t id_count, const char *what) {
    if (id < -1 || id >= id_count) {
        PyErr_Format(PyExc_ValueError, "%s id %ld is outside [-1, %d)", what, id, (int)id_count);
        return -1;
    }
    return 0;
}

static int add_long(LongTable *t, PyObject *word, Py_ssize_t len, int32_t id) {
    Py_UCS4 *cps = PyUnicode_AsUCS4Copy(word);
    if (!cps) return -1;
    uint64_t h = 0;
    for (Py_ssize_t i = 0; i < len; i++) h = hash_step(h, cps[i]);
    h = hash_final(h);
    for (uint64_t i = h & t->mask;; i = (i + 1) & t->mask) {
        LongSlot *s = &t->slots[i];
        if (s->hash == 0) {
            *s = (LongSlot){h, cps, len, id};
            break;
        }
        if (s->hash == h && s->len == len && memcmp(s->cps, cps, len * sizeof(Py_UCS4)) == 0) {
            s->id = id; /* the dict has unique keys, so this cannot happen; keep the table consistent anyway */
            PyMem_Free(cps);
            break;
        }
    }
    t->has_len[len] = 1;
    return 0;
}

static int Segmenter_init(Segmenter *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"entries", "kigou_id", "u2e_id", "byte_ids", "error", NULL};
    PyObject *entries, *byte_ids, *error;
    int kigou_id, u2e_id;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!iiOO", kwlist, &PyDict_Type, &entries, &kigou_id, &u2e_id,
                                     &byte_ids, &error))
        return -1;
    if (self->shorts.slots) {
        PyErr_SetString(PyExc_RuntimeError, "Segmenter is already initialised");
        return -1;
    }

    /* Sizes first: id range, number of short keys (spellings and their prefixes) and of long spellings. */
    PyObject *word, *value;
    Py_ssize_t pos = 0, n_short = 0, n_long = 0, long_max = 0;
    long max_id = -1;
    while (PyDict_Next(entries, &pos, &word, &value)) {
        if (!PyUnicode_Check(word) || !PyLong_Check(value)) {
            PyErr_SetString(PyExc_TypeError, "entries must map str to int");
            return -1;
        }
        long id = PyLong_AsLong(value);
        if (id < 0 || id > INT32_MAX - 1) {
            PyErr_Format(PyExc_ValueError, "vocabulary id %ld is out of range", id);
            return -1;
        }
        if (id > max_id) max_id = id;
        Py_ssize_t len = PyUnicode_GET_LENGTH(word);
        if (len >= 1 && len <= 3) n_short += len;
        if (len >= 3 && PyUnicode_READ_CHAR(word, 0) == '<') {
            n_long++;
            if (len > long_max) long_max = len;
        }
    }
    self->id_count = (int32_t)(max_id + 1);
    if (check_id(kigou_id, self->id_count, "<KIGOU>") || check_id(u2e_id, self->id_count, "<U2000U2BFF>"))
        return -1;
    self->kigou_id = kigou_id;
    self->u2e_id = u2e_id;

    PyObject *bytes_seq = PySequence_Fast(byte_ids, "byte_ids must be a sequence");
    if (!bytes_seq) return -1;
    if (PySequence_Fast_GET_SIZE(bytes_seq) != 256) {
        Py_DECREF(bytes_seq);
        PyErr_SetString(PyExc_ValueError, "byte_ids must have 256 entries");
        return -1;
    }
    for (int b = 0; b < 256; b++) {
        long id = PyLong_AsLong(PySequence_Fast_GET_ITEM(bytes_seq, b));
        if ((id == -1 && PyErr_Occurred()) || check_id(id, self->id_count, "byte")) {
            Py_DECREF(bytes_seq);
            return -1;
        }
        self->byte_ids[b] = (int32_t)id;
    }
    Py_DECREF(bytes_seq);

    uint64_t short_size = table_size(n_short), long_size = table_size(n_long);
    self->shorts.slots = PyMem_Calloc(short_size, sizeof(ShortSlot));
    self->shorts.mask = short_size - 1;
    self->longs.slots = PyMem_Calloc(long_size, sizeof(LongSlot));
    self->longs.mask = long_size - 1;
    self->longs.maxlen = long_max;
    self->longs.has_len = PyMem_Calloc(long_max + 1, 1);
    self->id_objects = PyMem_Calloc(self->id_count ? self->id_count : 1, sizeof(PyObject *));
    if (!self->shorts.slots || !self->longs.slots || !self->longs.has_len || !self->id_objects) {
        PyErr_NoMemory();
        return -1;
    }
    for (int32_t i = 0; i < self->id_count; i++)
        if (!(self->id_objects[i] = PyLong_FromLong(i))) return -1;

    pos = 0;
    while (PyDict_Next(entries, &pos, &word, &value)) {
        int32_t id = (int32_t)PyLong_AsLong(value);
        Py_ssize_t len = PyUnicode_GET_LENGTH(word);
        if (len >= 1 && len <= 3) {
            Py_UCS4 c[3] = {0, 0, 0};
            for (Py_ssize_t i = 0; i < len; i++) c[i] = PyUnicode_READ_CHAR(word, i);
            uint64_t keys[3] = {pack1(c[0]), pack2(c[0], c[1]), pack3(c[0], c[1], c[2])};
            for (Py_ssize_t i = 0; i + 1 < len; i++) short_insert(&self->shorts, keys[i])->extends = 1;
            short_insert(&self->shorts, keys[len - 1])->id = id;
        }
        if (len >= 3 && PyUnicode_READ_CHAR(word, 0) == '<' && add_long(&self->longs, word, len, id)) return -1;
    }
    Py_INCREF(error);
    self->error = error;
    return 0;
}

/* ---- the loop ----------------------------------------------------------------------------------------- */

typedef struct {
    int32_t *ids;
    Py_ssize_t len, cap;
} IdBuffer;

static inline int push(IdBuffer *b, int32_t id) {
    if (b->len == b->cap) {
        Py_ssize_t cap = b->cap ? b->cap * 2 : 64;
        int32_t *ids = PyMem_Realloc(b->ids, cap * sizeof(int32_t));
        if (!ids) {
            PyErr_NoMemory();
            return -1;
        }
        b->ids = ids;
        b->cap = cap;
    }
    b->ids[b->len++] = id;
    return 0;
}

/* Length of the longest '<'-spelling of 3+ code points starting at text[pos] (its id in *id), or 0. */
static Py_ssize_t longest_angle(const LongTable *t, int kind, const void *data, Py_ssize_t pos, Py_ssize_t n,
                                int32_t *id) {
    Py_ssize_t max = n - pos < t->maxlen ? n - pos : t->maxlen;
    if (max < 3) return 0;
    uint64_t prefix_hash[max + 1];
    uint64_t h = 0;
    for (Py_ssize_t L = 1; L <= max; L++) {
        h = hash_step(h, PyUnicode_READ(kind, data, pos + L - 1));
        prefix_hash[L] = hash_final(h);
    }
    for (Py_ssize_t L = max; L >= 3; L--) {
        if (!t->has_len[L]) continue;
        uint64_t want = prefix_hash[L];
        for (uint64_t i = want & t->mask; t->slots[i].hash; i = (i + 1) & t->mask) {
            const LongSlot *s = &t->slots[i];
            if (s->hash != want || s->len != L) continue;
            Py_ssize_t k = 0;
            while (k < L && s->cps[k] == PyUnicode_READ(kind, data, pos + k)) k++;
            if (k == L) {
                *id = s->id;
                return L;
            }
        }
    }
    return 0;
}

/* Tokens for a character that no spelling covers; pushes them, returns 0 or -1 with an exception set. */
static int fallback(Segmenter *self, IdBuffer *out, Py_UCS4 c, Py_ssize_t pos) {
    int32_t id;
    if ((c >= 0xA1 && c <= 0xBF) || (c >= 0x1C0 && c <= 0x1C3) || (c >= 0x2B9 && c <= 0x362))
        id = self->kigou_id;
    else if (c >= 0x2000 && c <= 0x2BFF)
        id = self->u2e_id;
    else {
        unsigned char u[4];
        int n;
        if (c < 0x80) {
            u[0] = (unsigned char)c;
            n = 1;
        } else if (c < 0x800) {
            u[0] = 0xC0 | (c >> 6), u[1] = 0x80 | (c & 0x3F);
            n = 2;
        } else if (c >= 0xD800 && c <= 0xDFFF) {
            char code[16]; /* PyErr_Format has no %04X before Python 3.12 */
            snprintf(code, sizeof code, "U+%04X", (unsigned)c);
            PyErr_Format(self->error,
                         "text has a lone surrogate %s at position %zd, which is not a character and has no "
                         "UTF-8 encoding",
                         code, pos);
            return -1;
        } else if (c < 0x10000) {
            u[0] = 0xE0 | (c >> 12), u[1] = 0x80 | ((c >> 6) & 0x3F), u[2] = 0x80 | (c & 0x3F);
            n = 3;
        } else {
            u[0] = 0xF0 | (c >> 18), u[1] = 0x80 | ((c >> 12) & 0x3F), u[2] = 0x80 | ((c >> 6) & 0x3F);
            u[3] = 0x80 | (c & 0x3F);
            n = 4;
        }
        for (int i = 0; i < n; i++) {
            if (self->byte_ids[u[i]] < 0) goto missing;
            if (push(out, self->byte_ids[u[i]])) return -1;
        }
        return 0;
    }
    if (id < 0) goto missing;
    return push(out, id);
missing:;
    char code[16];
    snprintf(code, sizeof code, "U+%04X", (unsigned)c);
    PyErr_Format(self->error, "character %s at position %zd has no token, and the vocabulary has no unk token", code,
                 pos);
    return -1;
}

/* Inlined once per string kind (1, 2 or 4 bytes per code point), so PyUnicode_READ compiles to a plain load. */
static inline __attribute__((always_inline)) int segment(Segmenter *self, IdBuffer *out, const int kind,
                                                         const void *data, Py_ssize_t n) {
    const ShortTable *t = &self->shorts;
    Py_ssize_t pos = 0;
    while (pos < n) {
        Py_UCS4 c0 = PyUnicode_READ(kind, data, pos);
        int32_t best = -1;
        Py_ssize_t best_len = 0;
        if (c0 == '<') /* a '<...>' spelling of 3+ code points wins outright; else only 1..2 are candidates */
            best_len = longest_angle(&self->longs, kind, data, pos, n, &best);
        if (!best_len) {
            /* Smallest id among the window's prefixes in the vocabulary; on a tie the longer one (seen first). */
            const ShortSlot *s1 = short_find(t, pack1(c0));
            if (s1 && s1->extends && pos + 1 < n) {
                Py_UCS4 c1 = PyUnicode_READ(kind, data, pos + 1);
                const ShortSlot *s2 = short_find(t, pack2(c0, c1));
                if (s2 && s2->extends && pos + 2 < n && c0 != '<') {
                    const ShortSlot *s3 = short_find(t, pack3(c0, c1, PyUnicode_READ(kind, data, pos + 2)));
                    if (s3 && s3->id >= 0) best = s3->id, best_len = 3;
                }
                if (s2 && s2->id >= 0 && (best < 0 || s2->id < best)) best = s2->id, best_len = 2;
            }
            if (s1 && s1->id >= 0 && (best < 0 || s1->id < best)) best = s1->id, best_len = 1;
        }
        if (best_len) {
            if (push(out, best)) return -1;
            pos += best_len;
        } else {
            if (fallback(self, out, c0, pos)) return -1;
            pos += 1;
        }
    }
    return 0;
}

static PyObject *Segmenter_encode(Segmenter *self, PyObject *text) {
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "encode() takes a str");
        return NULL;
    }
    if (!self->shorts.slots) {
        PyErr_SetString(PyExc_RuntimeError, "Segmenter is not initialised");
        return NULL;
    }
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    const void *data = PyUnicode_DATA(text);
    IdBuffer out = {NULL, 0, 0};
    int rc;
    switch (PyUnicode_KIND(text)) {
    case PyUnicode_1BYTE_KIND: rc = segment(self, &out, PyUnicode_1BYTE_KIND, data, n); break;
    case PyUnicode_2BYTE_KIND: rc = segment(self, &out, PyUnicode_2BYTE_KIND, data, n); break;
    default: rc = segment(self, &out, PyUnicode_4BYTE_KIND, data, n); break;
    }
    PyObject *list = rc ? NULL : PyList_New(out.len);
    for (Py_ssize_t i = 0; list && i < out.len; i++) {
        PyObject *id = self->id_objects[out.ids[i]];
        Py_INCREF(id);
        PyList_SET_ITEM(list, i, id);
    }
    PyMem_Free(out.ids);
    return list;
}

/* ---- CharSet: which of a fixed set of characters occur in a text (the emoji pass's first-character filter) -- */

#define N_CODEPOINTS 0x110000

typedef struct {
    PyObject_HEAD
    uint8_t *member; /* bit per code point */
} CharSet;

static inline int bit_get(const uint8_t *bits, Py_UCS4 c) { return bits[c >> 3] >> (c & 7) & 1; }
static inline void bit_set(uint8_t *bits, Py_UCS4 c) { bits[c >> 3] |= (uint8_t)(1u << (c & 7)); }

static void CharSet_dealloc(CharSet *self) {
    PyMem_Free(self->member);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int CharSet_init(CharSet *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"chars", NULL};
    PyObject *chars;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "U", kwlist, &chars)) return -1;
    if (self->member) {
        PyErr_SetString(PyExc_RuntimeError, "CharSet is already initialised");
        return -1;
    }
    if (!(self->member = PyMem_Calloc(N_CODEPOINTS / 8, 1))) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyUnicode_GET_LENGTH(chars); i++) bit_set(self->member, PyUnicode_READ_CHAR(chars, i));
    return 0;
}

/* Adds each member character of text to `found`. Members below 256 (digits, ASCII punctuation: the frequent
   ones) are added once thanks to a local bitmap; the set itself ignores repeats of the rare others. */
static inline __attribute__((always_inline)) int scan(const CharSet *self, PyObject *found, const int kind,
                                                      const void *data, Py_ssize_t n) {
    uint8_t seen_latin1[32] = {0};
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (!bit_get(self->member, c)) continue;
        if (c < 256) {
            if (bit_get(seen_latin1, c)) continue;
            bit_set(seen_latin1, c);
        }
        PyObject *s = PyUnicode_FromOrdinal(c);
        int rc = s ? PySet_Add(found, s) : -1;
        Py_XDECREF(s);
        if (rc) return -1;
    }
    return 0;
}

static PyObject *CharSet_intersection(CharSet *self, PyObject *text) {
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "intersection() takes a str");
        return NULL;
    }
    if (!self->member) {
        PyErr_SetString(PyExc_RuntimeError, "CharSet is not initialised");
        return NULL;
    }
    PyObject *found = PySet_New(NULL);
    if (!found) return NULL;
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    const void *data = PyUnicode_DATA(text);
    int rc;
    switch (PyUnicode_KIND(text)) {
    case PyUnicode_1BYTE_KIND: rc = scan(self, found, PyUnicode_1BYTE_KIND, data, n); break;
    case PyUnicode_2BYTE_KIND: rc = scan(self, found, PyUnicode_2BYTE_KIND, data, n); break;
    default: rc = scan(self, found, PyUnicode_4BYTE_KIND, data, n); break;
    }
    if (rc) {
        Py_DECREF(found);
        return NULL;
    }
    return found;
}

static PyMethodDef CharSet_methods[] = {
    {"intersection", (PyCFunction)CharSet_intersection, METH_O,
     "intersection(text) -> set[str]: the member characters that occur in text"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CharSetType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "neoxja.tokenization._abeja_native.CharSet",
    .tp_basicsize = sizeof(CharSet),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A fixed set of characters, tested against whole texts at memory speed.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)CharSet_init,
    .tp_dealloc = (destructor)CharSet_dealloc,
    .tp_methods = CharSet_methods,
};

static PyMethodDef Segmenter_methods[] = {
    {"encode", (PyCFunction)Segmenter_encode, METH_O, "encode(text) -> list[int]: ids of normalised text"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SegmenterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "neoxja.tokenization._abeja_native.Segmenter",
    .tp_basicsize = sizeof(Segmenter),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The ABEJA sub-word segmentation over a fixed vocabulary.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Segmenter_init,
    .tp_dealloc = (destructor)Segmenter_dealloc,
    .tp_methods = Segmenter_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_abeja_native", "Native segmentation loop of the ABEJA tokenizer.", -1,
    NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__abeja_native(void) {
    if (PyType_Ready(&SegmenterType) < 0 || PyType_Ready(&CharSetType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Segmenter", (PyObject *)&SegmenterType) < 0 ||
        PyModule_AddObjectRef(m, "CharSet", (PyObject *)&CharSetType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
