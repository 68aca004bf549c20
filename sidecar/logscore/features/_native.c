/* The compiled featurizer: the hot path of sidecar/logscore/features, in C.
 *
 * Every function here is a twin of Python code that stays the reference (and the fallback
 * when this extension is not built): it must give bit-identical features. The tests compare
 * the two on random and real inputs (tests/test_native.py). Where a case is rare and its
 * exact semantics are subtle (non-ASCII case mapping, float() of odd strings, UTF-8 decoding
 * with "replace"), this code calls the same CPython function the reference calls.
 *
 *   access_columns   records -> one column per wanted field (parsers.py _ACCESS_FAST, else the
 *                    Python normalizer), cut to max_field_chars      (Featurizer.normalized_values)
 *   distinct         a column -> ids and distinct values              (Featurizer.transform)
 *   Cache            two generations bounded in entries and bytes     (converters.ValueCache)
 *   Features         one value's keys and weights                     (batch.ValueFeatures)
 *   text_features    texts -> counted crc32 keys                      (Converter._hash)
 *   ngram_encode, ngram_features                                      (NgramConverter)
 *   url_structures, url_features                                      (UrlConverter)
 *   numeric_labels                                                    (NumericConverter)
 *   assemble         per-record expansion of all converters          (FeatureSink.build)
 *   key_counts       a column -> records per window key               (windows.KeyNamer.key_counts)
 *   SurpriseTable    a graph's rarity lookup and per-record sums      (graph_shortcut.RarityShortcut)
 *
 * Arrays go out as bytearrays; the Python side wraps them with numpy.frombuffer (no numpy
 * headers needed to build).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>  /* x86-64 always has it: four code points a step where URLs are read */
#endif

/* ------------------------------------------------------------------ buffers */

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Bytes;

/* Where a buffer that holds no allocation points (cap 0): never NULL, so an empty text is read at a
 * real address (NULL + 0, and memcmp or memmove of NULL, are undefined even for 0 bytes). */
static int64_t no_bytes[2];
#define NO_BYTES ((char *)no_bytes)

static int bytes_reserve(Bytes *b, Py_ssize_t extra) {
    if (b->len + extra <= b->cap) return 0;
    Py_ssize_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra) cap *= 2;
    char *data = b->cap ? PyMem_Realloc(b->data, cap) : PyMem_Malloc(cap);
    if (!data) { PyErr_NoMemory(); return -1; }
    b->data = data;
    b->cap = cap;
    return 0;
}

static int bytes_add(Bytes *b, const void *src, Py_ssize_t n) {
    if (n == 0) return 0;  /* src may be NULL then (memcpy's arguments must not be) */
    if (bytes_reserve(b, n) < 0) return -1;
    memcpy(b->data + b->len, src, n);
    b->len += n;
    return 0;
}

static int bytes_byte(Bytes *b, unsigned char c) { return bytes_add(b, &c, 1); }

static int bytes_str(Bytes *b, const char *s) { return bytes_add(b, s, (Py_ssize_t)strlen(s)); }

/* Buffers are reused across calls (a batch's buffers reach megabytes: allocating them anew
 * each call cost page faults). NOTE: taken and given back with the GIL held, so two threads
 * never share one, even when a Python callback lets another thread run meanwhile. */
#define POOLED 32
#define POOLED_MAX_BYTES (16 << 20) /* kept between calls, all buffers together */
static struct { char *data; Py_ssize_t cap; } pool[POOLED];
static int pooled;
static Py_ssize_t pooled_bytes;

static void bytes_take(Bytes *b) {
    if (pooled > 0) {  /* the largest: a call takes its big buffers first */
        int best = 0;
        for (int i = 1; i < pooled; i++) if (pool[i].cap > pool[best].cap) best = i;
        b->data = pool[best].data;
        b->cap = pool[best].cap;
        pooled_bytes -= b->cap;
        pool[best] = pool[--pooled];
    } else {
        b->data = NO_BYTES;
        b->cap = 0;
    }
    b->len = 0;
}

static void bytes_free(Bytes *b) {
    if (b->cap == 0) {  /* NO_BYTES, or NULL: nothing allocated */
    } else if (pooled < POOLED && pooled_bytes + b->cap <= POOLED_MAX_BYTES) {
        pool[pooled].data = b->data;
        pool[pooled].cap = b->cap;
        pooled_bytes += b->cap;
        pooled++;
    } else {
        PyMem_Free(b->data);
    }
    b->data = NULL;
    b->len = b->cap = 0;
}

/* Code points (a str read as UCS4). */
typedef struct {
    Py_UCS4 *data;
    Py_ssize_t len, cap;
} Text;

static int text_reserve(Text *t, Py_ssize_t n) {
    if (n <= t->cap) return 0;
    Py_ssize_t cap = t->cap ? t->cap : 128;
    while (cap < n) cap *= 2;
    Py_UCS4 *data = t->cap ? PyMem_Realloc(t->data, cap * sizeof(Py_UCS4)) : PyMem_Malloc(cap * sizeof(Py_UCS4));
    if (!data) { PyErr_NoMemory(); return -1; }
    t->data = data;
    t->cap = cap;
    return 0;
}

static int text_push(Text *t, Py_UCS4 c) {
    if (text_reserve(t, t->len + 1) < 0) return -1;
    t->data[t->len++] = c;
    return 0;
}

static int text_set(Text *t, const Py_UCS4 *src, Py_ssize_t n) {
    if (text_reserve(t, n) < 0) return -1;
    if (n > 0) memmove(t->data, src, n * sizeof(Py_UCS4));  /* both may be NULL when n == 0 */
    t->len = n;
    return 0;
}

static int text_from_str(Text *t, PyObject *s) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(s), i = 0;
    if (text_reserve(t, n) < 0) return -1;
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
#if defined(__SSE2__)
    if (kind == PyUnicode_1BYTE_KIND) {  /* most values: bytes widened 16 at a time */
        const __m128i zero = _mm_setzero_si128();
        for (; i + 16 <= n; i += 16) {
            __m128i bytes = _mm_loadu_si128((const __m128i *)((const Py_UCS1 *)data + i));
            __m128i low = _mm_unpacklo_epi8(bytes, zero), high = _mm_unpackhi_epi8(bytes, zero);
            _mm_storeu_si128((__m128i *)(t->data + i), _mm_unpacklo_epi16(low, zero));
            _mm_storeu_si128((__m128i *)(t->data + i + 4), _mm_unpackhi_epi16(low, zero));
            _mm_storeu_si128((__m128i *)(t->data + i + 8), _mm_unpacklo_epi16(high, zero));
            _mm_storeu_si128((__m128i *)(t->data + i + 12), _mm_unpackhi_epi16(high, zero));
        }
    }
#endif
    for (; i < n; i++) t->data[i] = PyUnicode_READ(kind, data, i);
    t->len = n;
    return 0;
}

static void text_take(Text *t) {
    Bytes b;
    bytes_take(&b);
    t->data = (Py_UCS4 *)b.data;
    t->cap = b.cap / (Py_ssize_t)sizeof(Py_UCS4);
    t->len = 0;
}

static void text_free(Text *t) {
    Bytes b = {(char *)t->data, 0, t->cap * (Py_ssize_t)sizeof(Py_UCS4)};
    bytes_free(&b);
    t->data = NULL;
    t->len = t->cap = 0;
}

static PyObject *text_to_str(const Py_UCS4 *data, Py_ssize_t n) {
    return PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, data, n);
}

/* str.encode("utf-8", "surrogatepass") of code points: surrogates get their 3-byte form. */
static int utf8_add(Bytes *b, const Py_UCS4 *data, Py_ssize_t n) {
    if (bytes_reserve(b, 4 * n) < 0) return -1;
    unsigned char *out = (unsigned char *)b->data + b->len;
    Py_ssize_t i = 0;
#if defined(__SSE2__)
    /* ASCII, 8 code points a step: each is its own byte (packing saturates only values >= 0x80) */
    const __m128i high_bits = _mm_set1_epi32(~0x7F);
    for (; i + 8 <= n; i += 8) {
        __m128i first = _mm_loadu_si128((const __m128i *)(data + i)), second = _mm_loadu_si128((const __m128i *)(data + i + 4));
        __m128i beyond = _mm_and_si128(_mm_or_si128(first, second), high_bits);
        if (_mm_movemask_epi8(_mm_cmpeq_epi32(beyond, _mm_setzero_si128())) != 0xFFFF) break;
        __m128i words = _mm_packs_epi32(first, second);
        _mm_storel_epi64((__m128i *)out, _mm_packus_epi16(words, words));
        out += 8;
    }
#endif
    for (; i < n; i++) {
        Py_UCS4 c = data[i];
        if (c < 0x80) {
            *out++ = (unsigned char)c;
        } else if (c < 0x800) {
            *out++ = 0xC0 | (c >> 6);
            *out++ = 0x80 | (c & 0x3F);
        } else if (c < 0x10000) {
            *out++ = 0xE0 | (c >> 12);
            *out++ = 0x80 | ((c >> 6) & 0x3F);
            *out++ = 0x80 | (c & 0x3F);
        } else {
            *out++ = 0xF0 | (c >> 18);
            *out++ = 0x80 | ((c >> 12) & 0x3F);
            *out++ = 0x80 | ((c >> 6) & 0x3F);
            *out++ = 0x80 | (c & 0x3F);
        }
    }
    b->len = (char *)out - b->data;
    return 0;
}

static int utf8_add_str(Bytes *b, PyObject *s) {
    if (PyUnicode_IS_ASCII(s)) return bytes_add(b, PyUnicode_DATA(s), PyUnicode_GET_LENGTH(s));
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (utf8_add(b, &c, 1) < 0) return -1;
    }
    return 0;
}

/* Loads from a buffer a caller gave (any alignment). */
static inline int64_t load_i64(const void *p, Py_ssize_t i) { int64_t v; memcpy(&v, (const char *)p + i * 8, 8); return v; }
static inline float load_f32(const void *p, Py_ssize_t i) { float v; memcpy(&v, (const char *)p + i * 4, 4); return v; }

static PyObject *new_bytearray(Py_ssize_t nbytes) {
    return PyByteArray_FromStringAndSize(NULL, nbytes);
}

/* ------------------------------------------------------------------ crc32 (zlib.crc32) */

static uint32_t crc_table[8][256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xFF];
}

static uint32_t crc32_update(uint32_t crc, const unsigned char *p, Py_ssize_t n) {
    uint32_t c = crc ^ 0xFFFFFFFFu;
    while (n >= 8) {
        uint32_t lo = c ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
        uint32_t hi = (uint32_t)p[4] | (uint32_t)p[5] << 8 | (uint32_t)p[6] << 16 | (uint32_t)p[7] << 24;
        c = crc_table[7][lo & 0xFF] ^ crc_table[6][(lo >> 8) & 0xFF] ^ crc_table[5][(lo >> 16) & 0xFF] ^
            crc_table[4][lo >> 24] ^ crc_table[3][hi & 0xFF] ^ crc_table[2][(hi >> 8) & 0xFF] ^
            crc_table[1][(hi >> 16) & 0xFF] ^ crc_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n-- > 0) c = crc_table[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

/* ------------------------------------------------------------------ Features */

/* One distinct value's features (twin of batch.ValueFeatures): n keys (int64) then n weights
 * (float32), stored inline; plus the converter and value that name a key on request.
 * NOTE: the converter is held through a weak reference (one per converter, shared), so no
 * reference cycle runs converter -> cache -> Features -> converter, and Features need no
 * garbage-collector tracking: millions are made on novel traffic, and tracking them made the
 * collector run often. */
typedef struct {
    PyObject_VAR_HEAD
    PyObject *converter_ref;  /* weakref.ref(converter) */
    PyObject *value;          /* a str or None */
    int64_t data[1];
} FeaturesObject;

static PyTypeObject FeaturesType;
static PyObject *numpy_frombuffer, *dtype_int64, *dtype_float32;

#define FEATURES_KEYS(f) ((f)->data)
#define FEATURES_WEIGHTS(f) ((float *)((f)->data + Py_SIZE(f)))

static FeaturesObject *features_new(Py_ssize_t n, PyObject *converter_ref, PyObject *value) {
    FeaturesObject *f = PyObject_NewVar(FeaturesObject, &FeaturesType, n);
    if (!f) return NULL;
    f->converter_ref = Py_NewRef(converter_ref);
    f->value = Py_NewRef(value);
    return f;
}

static void features_dealloc(FeaturesObject *f) {
    Py_DECREF(f->converter_ref);
    Py_DECREF(f->value);
    PyObject_Free(f);
}

static int check_converter_ref(PyObject *ref) {
    if (PyWeakref_CheckRef(ref)) return 0;
    PyErr_SetString(PyExc_TypeError, "converter must be given as weakref.ref(converter)");
    return -1;
}

static PyObject *array_of(const void *src, Py_ssize_t nbytes, PyObject *dtype) {
    PyObject *buffer = PyByteArray_FromStringAndSize(src, nbytes);
    if (!buffer) return NULL;
    PyObject *array = PyObject_CallFunctionObjArgs(numpy_frombuffer, buffer, dtype, NULL);
    Py_DECREF(buffer);
    return array;
}

static PyObject *features_keys(FeaturesObject *f, void *closure) {
    return array_of(FEATURES_KEYS(f), Py_SIZE(f) * 8, dtype_int64);
}

static PyObject *features_weights(FeaturesObject *f, void *closure) {
    return array_of(FEATURES_WEIGHTS(f), Py_SIZE(f) * 4, dtype_float32);
}

static Py_ssize_t features_nbytes_of(FeaturesObject *f) {
    return (Py_ssize_t)(FeaturesType.tp_basicsize + Py_SIZE(f) * FeaturesType.tp_itemsize);
}

static PyObject *features_size(FeaturesObject *f, void *closure) { return PyLong_FromSsize_t(Py_SIZE(f)); }

static PyObject *features_nbytes(FeaturesObject *f, void *closure) {
    return PyLong_FromSsize_t(features_nbytes_of(f));
}

static PyObject *features_converter(FeaturesObject *f, void *closure) {
    return Py_NewRef(PyWeakref_GetObject(f->converter_ref));  /* None once the converter is gone */
}

static PyObject *features_value(FeaturesObject *f, void *closure) { return Py_NewRef(f->value); }

static PyObject *features_describe(FeaturesObject *f, PyObject *arg) {
    Py_ssize_t index = PyLong_AsSsize_t(arg);
    if (index == -1 && PyErr_Occurred()) return NULL;
    if (index < 0 || index >= Py_SIZE(f)) {
        PyErr_SetString(PyExc_IndexError, "feature index out of range");
        return NULL;
    }
    PyObject *key = PyLong_FromLongLong(FEATURES_KEYS(f)[index]);
    if (!key) return NULL;
    PyObject *converter = Py_NewRef(PyWeakref_GetObject(f->converter_ref));  /* held: describe runs Python code */
    PyObject *name = converter == Py_None ? PyUnicode_FromFormat("feature #%S", key)
                                          : PyObject_CallMethod(converter, "describe", "OO", f->value, key);
    Py_DECREF(converter);
    Py_DECREF(key);
    return name;
}

static PyGetSetDef features_getset[] = {
    {"keys", (getter)features_keys, NULL, "int64 keys (a copy)", NULL},
    {"weights", (getter)features_weights, NULL, "float32 weights, converter weight included (a copy)", NULL},
    {"converter", (getter)features_converter, NULL, "names a key of the value", NULL},
    {"value", (getter)features_value, NULL, "the value (the first one holding these features)", NULL},
    {"nbytes", (getter)features_nbytes, NULL, "memory held, in bytes", NULL},
    {"size", (getter)features_size, NULL, "how many keys (len(keys), without the copy)", NULL},
    {NULL}};

static PyMethodDef features_methods[] = {
    {"describe", (PyCFunction)features_describe, METH_O, "the readable name of key number i"},
    {NULL}};

static PyTypeObject FeaturesType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "logscore.features._native.Features",
    .tp_basicsize = offsetof(FeaturesObject, data),
    .tp_itemsize = 12,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The features of one distinct field value (compiled twin of ValueFeatures).",
    .tp_dealloc = (destructor)features_dealloc,
    .tp_getset = features_getset,
    .tp_methods = features_methods,
};

/* ------------------------------------------------------------------ lists of callers */

/* A tuple of a list's items: our own references, read by index while Python code we call (a
 * weigher, compute, a set's __eq__, a finalizer run by an allocation that collects garbage) may
 * change the list. NOTE: not PyList_AsTuple or PyList_GetSlice: they take the list's length (and
 * item array) before allocating the copy, and that allocation may collect garbage whose
 * finalizers shrink the list; here the items are read after it, with no Python code between. */
static PyObject *own_items(PyObject *list) {
    for (;;) {
        Py_ssize_t n = PyList_GET_SIZE(list);
        PyObject *items = PyTuple_New(n);
        if (!items) return NULL;
        if (PyList_GET_SIZE(list) == n) {
            for (Py_ssize_t i = 0; i < n; i++) PyTuple_SET_ITEM(items, i, Py_NewRef(PyList_GET_ITEM(list, i)));
            return items;
        }
        Py_DECREF(items);  /* the list changed while the tuple was made: again */
    }
}

/* A new list of n NULL slots, hidden from the garbage collector until shown filled: Python code run
 * meanwhile (callbacks, finalizers of garbage a collection finds) may walk the heap
 * (gc.get_objects) and must not read its NULL slots. */
static PyObject *hidden_list(Py_ssize_t n) {
    PyObject *list = PyList_New(n);
    if (list) PyObject_GC_UnTrack(list);
    return list;
}

static PyObject *shown(PyObject *list) {
    PyObject_GC_Track(list);
    return list;
}

/* ------------------------------------------------------------------ open addressing */

/* The slots a hash visits, in the order CPython's dict visits them: every bit of the hash soon
 * takes part. Probing on from hash & mask instead lets keys that merely share their low bits
 * (easy to find when the hash seed is known, as performance runs fix it) pile into one run of
 * thousands of slots that every lookup of them walks. Every table of this module probes so. */
typedef struct { size_t at, perturb, mask; } Probe;

static inline Probe probe_start(size_t hash, size_t mask) {
    return (Probe){hash & mask, hash, mask};
}

static inline void probe_next(Probe *p) {
    p->perturb >>= 5;
    p->at = (p->at * 5 + p->perturb + 1) & p->mask;
}

/* ------------------------------------------------------------------ Cache */

/* Twin of converters.ValueCache: a value found in the older generation moves to the newer;
 * when the newer holds half the entries or half the bytes allowed, it becomes the older and
 * the older is dropped.
 * NOTE: each generation is a table of our own (hash, key, entry), not a dict: on novel traffic
 * every value misses both generations and is then stored, and a dict's lookup, insert and growth
 * cost several times this table's probe. Keys are hashed by Python (the hash a str or bytes keeps,
 * computed once) and probed in a dict's order (Probe), so crafted values collide no more here than
 * in a dict. Nothing in a table's lookups or inserts runs Python code: only releasing a key or
 * entry may (a finalizer). */
typedef struct {
    Py_hash_t hash;
    PyObject *key, *entry;  /* our references; key NULL: the slot is free */
} CacheSlot;

typedef struct {
    CacheSlot *slots;  /* NULL while empty */
    Py_ssize_t size, used;  /* size: a power of two, 0 while empty */
} CacheTable;

typedef struct {
    PyObject_HEAD
    CacheTable newer, older;
    Py_ssize_t half_entries, half_bytes, newer_bytes, older_bytes;
    /* The doorkeeper (Cache(..., doorkeeper=True)): a bit per hash slot, set when a computed key is
     * offered the first time; only a key offered again while its bit is set is stored. NULL: every
     * computed key is stored, as in ValueCache. */
    uint64_t *seen;
    Py_ssize_t seen_shift, seen_marked;  /* 2^seen_shift bits; bits set since they were last cleared */
} CacheObject;

/* NOTE: on novel traffic almost every value is new, and a cache that stores each computed value
 * keeps megabytes of entries that are never asked for again (a generation turned over every two
 * batches of 1,000 URLs): each new entry went to memory out of the core's caches and was freed
 * from there batches later. Featurizing novel traffic with the n-gram converter's cache taken
 * away cost 8-15 % less. Once the cache has turned over (it evicts), the doorkeeper stores a value
 * the second time it is computed in a while: one bit tested per new value (16 KiB for 16,384
 * entries), and the entries of a batch that are not stored are freed with it, in memory still
 * warm. A value seen twice is cached one computation later; the features are the same either way. */
#define SEEN_BITS_PER_ENTRY 8  /* bits per entry the cache holds; cleared at an eighth of them set */

#define CACHE_TABLE_MIN 8

/* Equal as dict keys, for the cache's keys (exact str, bytes or None: check_key) and distinct()'s
 * values (exact str or None): equal ones are of one type, and equal strs of one kind. */
static int same_key(PyObject *a, PyObject *b) {
    if (a == b) return 1;
    if (Py_TYPE(a) != Py_TYPE(b) || a == Py_None) return 0;
    if (PyBytes_CheckExact(a))
        return PyBytes_GET_SIZE(a) == PyBytes_GET_SIZE(b) &&
               memcmp(PyBytes_AS_STRING(a), PyBytes_AS_STRING(b), PyBytes_GET_SIZE(a)) == 0;
    Py_ssize_t n = PyUnicode_GET_LENGTH(a);
    int kind = PyUnicode_KIND(a);
    return n == PyUnicode_GET_LENGTH(b) && kind == PyUnicode_KIND(b) &&
           memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), n * kind) == 0;
}

/* The slot holding key, or the free slot where it goes (the table must have one). */
static CacheSlot *table_slot(const CacheTable *t, PyObject *key, Py_hash_t hash) {
    for (Probe p = probe_start((size_t)hash, (size_t)t->size - 1);; probe_next(&p)) {
        CacheSlot *slot = &t->slots[p.at];
        if (!slot->key || (slot->hash == hash && same_key(slot->key, key))) return slot;
    }
}

static PyObject *table_get(const CacheTable *t, PyObject *key, Py_hash_t hash) {
    return t->used ? table_slot(t, key, hash)->entry : NULL;
}

/* Room for `entries` keys with a third of the slots left free (probes stay short). */
static int table_reserve(CacheTable *t, Py_ssize_t entries) {
    Py_ssize_t size = t->size ? t->size : CACHE_TABLE_MIN;
    while (size - size / 3 <= entries) size *= 2;
    if (size == t->size) return 0;
    CacheSlot *slots = PyMem_Calloc(size, sizeof *slots);
    if (!slots) { PyErr_NoMemory(); return -1; }
    CacheTable grown = {slots, size, t->used};
    for (Py_ssize_t i = 0; i < t->size; i++)
        if (t->slots[i].key) *table_slot(&grown, t->slots[i].key, t->slots[i].hash) = t->slots[i];
    PyMem_Free(t->slots);
    *t = grown;
    return 0;
}

/* Store key -> entry (new references taken). A key already there gets the new entry, as a dict's. */
static int table_put(CacheTable *t, PyObject *key, Py_hash_t hash, PyObject *entry) {
    if (table_reserve(t, t->used + 1) < 0) return -1;
    CacheSlot *slot = table_slot(t, key, hash);
    if (slot->key) {
        PyObject *replaced = slot->entry;
        slot->entry = Py_NewRef(entry);
        Py_DECREF(replaced);  /* last: its finalizer may use the cache */
        return 0;
    }
    *slot = (CacheSlot){hash, Py_NewRef(key), Py_NewRef(entry)};
    t->used++;
    return 0;
}

/* Release a table taken out of its cache first (finalizers of what it held may use the cache). */
static void table_release(CacheTable t) {
    for (Py_ssize_t i = 0; i < t.size; i++) {
        if (!t.slots[i].key) continue;
        Py_DECREF(t.slots[i].key);
        Py_DECREF(t.slots[i].entry);
    }
    PyMem_Free(t.slots);
}

static void seen_clear(CacheObject *self) {
    if (self->seen) memset(self->seen, 0, ((size_t)1 << self->seen_shift) / 8);
    self->seen_marked = 0;
}

/* Whether a computed key with this hash is stored: always without a doorkeeper, or before the cache
 * first turned over (it evicts nothing yet: a log of few values is cached at once, as before); else
 * when its bit was set by an earlier offer (else the bit is set now). The bit is picked by all the
 * hash's bits (Fibonacci hashing): keys crafted to share low bits do not share a bit for that.
 * Clearing at an eighth set keeps a key's chance of being stored at its first offer under one in
 * eight. */
static int seen_before(CacheObject *self, Py_hash_t hash) {
    if (!self->seen || !self->older.used) return 1;
    size_t bit = (size_t)(((uint64_t)hash * 0x9E3779B97F4A7C15ull) >> (64 - self->seen_shift));
    uint64_t mask = (uint64_t)1 << (bit & 63), *word = &self->seen[bit >> 6];
    if (*word & mask) return 1;
    if (self->seen_marked >= ((Py_ssize_t)1 << self->seen_shift) / 8) seen_clear(self);
    self->seen[bit >> 6] |= mask;
    self->seen_marked++;
    return 0;
}

static void cache_forget(CacheObject *self) {
    seen_clear(self);
    CacheTable newer = self->newer, older = self->older;
    self->newer = self->older = (CacheTable){NULL, 0, 0};
    self->newer_bytes = self->older_bytes = 0;
    table_release(newer);
    table_release(older);
}

/* converters.key_bytes: 1 byte a character for ASCII, else 4 (whatever the str's kind). */
static Py_ssize_t key_bytes(PyObject *key) {
    if (PyUnicode_Check(key)) return 49 + PyUnicode_GET_LENGTH(key) * (PyUnicode_IS_ASCII(key) ? 1 : 4);
    if (PyBytes_Check(key)) return 33 + PyBytes_GET_SIZE(key);
    return 64;
}

static Py_ssize_t entry_bytes(PyObject *entry) {
    if (Py_TYPE(entry) == &FeaturesType) return features_nbytes_of((FeaturesObject *)entry);
    PyObject *n = PyObject_GetAttrString(entry, "nbytes");
    if (!n) { PyErr_Clear(); return 256; }
    Py_ssize_t size = PyLong_AsSsize_t(n);
    Py_DECREF(n);
    if (size < 0) { PyErr_Clear(); return 256; }
    return size;
}

/* converters.held_bytes: the value an entry names its features by, counted unless it is the key (the
 * URL structure cache's entries keep a URL that their bytes key does not count). */
static Py_ssize_t held_bytes(PyObject *key, PyObject *entry) {
    PyObject *held;
    if (Py_TYPE(entry) == &FeaturesType) {
        held = Py_NewRef(((FeaturesObject *)entry)->value);
    } else {
        held = PyObject_GetAttrString(entry, "value");
        if (!held) { PyErr_Clear(); return 0; }
    }
    int same = held == Py_None || held == key ||
               (Py_TYPE(held) == Py_TYPE(key) && (PyUnicode_CheckExact(held) || PyBytes_CheckExact(held)) &&
                same_key(held, key));
    Py_ssize_t size = same ? 0 : key_bytes(held);
    Py_DECREF(held);
    return size;
}

static PyObject *cache_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    CacheObject *self = (CacheObject *)type->tp_alloc(type, 0);  /* zeroed: two empty tables */
    if (!self) return NULL;
    self->half_entries = self->half_bytes = 1;
    return (PyObject *)self;
}

static int cache_init(CacheObject *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"entries", "max_bytes", "doorkeeper", NULL};
    Py_ssize_t entries, max_bytes;
    int doorkeeper = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "nn|p", names, &entries, &max_bytes, &doorkeeper)) return -1;
    self->half_entries = entries / 2 > 1 ? entries / 2 : 1;
    self->half_bytes = max_bytes / 2 > 1 ? max_bytes / 2 : 1;
    PyMem_Free(self->seen);
    self->seen = NULL;
    if (doorkeeper) {
        /* 512 bits at least (64 keys before a clear), 2 MiB at most (no product that overflows) */
        Py_ssize_t shift = 9;
        while (shift < 24 && ((Py_ssize_t)1 << shift) / (2 * SEEN_BITS_PER_ENTRY) < self->half_entries) shift++;
        self->seen_shift = shift;
        self->seen = PyMem_Calloc(((size_t)1 << shift) / 8, 1);
        if (!self->seen) { PyErr_NoMemory(); return -1; }
    }
    cache_forget(self);
    return 0;
}

/* Keys are what the featurizer makes: exact str, bytes or None. Their hashing and comparing run
 * no Python code, so no lookup can re-enter the cache or change a list being read. */
static int check_key(PyObject *key) {
    if (key == Py_None || PyUnicode_CheckExact(key) || PyBytes_CheckExact(key)) return 0;
    PyErr_Format(PyExc_TypeError, "cache keys must be str, bytes or None (not a subclass); got %.100s",
                 Py_TYPE(key)->tp_name);
    return -1;
}

/* NOTE: Python code can still run in here (an entry's nbytes, the finalizer of a value dropped with
 * the older generation or of an entry replaced), and may use this cache again: the generations
 * are swapped before the dropped one is released, and the entry is stored before its size is
 * asked. */
static int cache_put_item(CacheObject *self, PyObject *key, Py_hash_t hash, PyObject *entry) {
    if (self->newer.used >= self->half_entries || self->newer_bytes >= self->half_bytes) {
        /* As large as the generation it follows grew: on novel traffic a generation fills at once. */
        CacheTable fresh = {NULL, 0, 0};
        if (table_reserve(&fresh, self->newer.used) < 0) return -1;
        CacheTable dropped = self->older;
        self->older = self->newer;
        self->newer = fresh;
        self->older_bytes = self->newer_bytes;
        self->newer_bytes = 0;
        table_release(dropped);
    }
    if (table_put(&self->newer, key, hash, entry) < 0) return -1;
    self->newer_bytes += key_bytes(key) + entry_bytes(entry) + held_bytes(key, entry);
    return 0;
}

/* A new reference to the entry of key, or NULL: absent (no exception) or failed (*error set). */
static PyObject *cache_get_item(CacheObject *self, PyObject *key, int *error) {
    *error = 0;
    Py_hash_t hash = PyObject_Hash(key);  /* a str or bytes keeps it: computed once */
    if (hash == -1) { *error = 1; return NULL; }
    PyObject *entry = table_get(&self->newer, key, hash);
    if (entry) return Py_NewRef(entry);
    entry = Py_XNewRef(table_get(&self->older, key, hash));
    if (!entry) return NULL;
    if (cache_put_item(self, key, hash, entry) < 0) { Py_DECREF(entry); *error = 1; return NULL; }
    return entry;
}

/* cache_put_item for a key not hashed yet. */
static int cache_store(CacheObject *self, PyObject *key, PyObject *entry) {
    Py_hash_t hash = PyObject_Hash(key);
    return hash == -1 ? -1 : cache_put_item(self, key, hash, entry);
}

/* cache_store for an entry just computed: the doorkeeper may turn it away (seen_before). */
static int cache_offer(CacheObject *self, PyObject *key, PyObject *entry) {
    Py_hash_t hash = PyObject_Hash(key);
    if (hash == -1) return -1;
    return seen_before(self, hash) ? cache_put_item(self, key, hash, entry) : 0;
}

static PyObject *cache_get(CacheObject *self, PyObject *key) {
    int error;
    if (check_key(key) < 0) return NULL;
    PyObject *entry = cache_get_item(self, key, &error);
    if (error) return NULL;
    return entry ? entry : Py_NewRef(Py_None);
}

static PyObject *cache_put(CacheObject *self, PyObject *args) {
    PyObject *key, *entry;
    if (!PyArg_ParseTuple(args, "OO", &key, &entry) || check_key(key) < 0) return NULL;
    if (cache_store(self, key, entry) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *cache_clear_method(CacheObject *self, PyObject *unused) {
    cache_forget(self);
    Py_RETURN_NONE;
}

/* Drop a list from found_entries whose misses are not all filled. */
static void found_release(PyObject *found) {
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(found); i++)
        if (!PyList_GET_ITEM(found, i)) PyList_SET_ITEM(found, i, Py_NewRef(Py_None));
    Py_DECREF(found);
}

/* The cached entry of each key, as a new list with NULL where a key is missing (counted in
 * *missing); NULL on error. keys: a tuple. NOTE: the list is hidden from the garbage collector (gc.get_objects
 * in a compute callback must not see its NULL slots) until found_done hands it out filled, or
 * found_release drops it. */
static PyObject *found_entries(CacheObject *self, PyObject *keys, Py_ssize_t *missing) {
    Py_ssize_t n = PyTuple_GET_SIZE(keys);
    for (Py_ssize_t i = 0; i < n; i++)
        if (check_key(PyTuple_GET_ITEM(keys, i)) < 0) return NULL;
    PyObject *found = PyList_New(n);
    if (!found) return NULL;
    PyObject_GC_UnTrack(found);
    *missing = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int error;
        PyObject *entry = cache_get_item(self, PyTuple_GET_ITEM(keys, i), &error);
        if (error) {
            found_release(found);
            return NULL;
        }
        if (!entry) (*missing)++;
        PyList_SET_ITEM(found, i, entry);  /* NULL marks a miss until filled */
    }
    return found;
}

static PyObject *found_done(PyObject *found) {
    PyObject_GC_Track(found);
    return found;
}

/* compute got lists it could change; reading them on after it did would go out of bounds. */
static int unchanged(PyObject *list, Py_ssize_t size) {
    if (PyList_GET_SIZE(list) == size) return 0;
    PyErr_SetString(PyExc_ValueError, "compute changed the length of a list it was given");
    return -1;
}

/* compute's result as a tuple of `size` entries (our own: compute may keep and change its list). */
static PyObject *computed_entries(PyObject *computed, Py_ssize_t size) {
    PyObject *sequence = PySequence_Fast(computed, "compute must return a sequence");
    if (!sequence) return NULL;
    PyObject *entries = PySequence_Tuple(sequence);
    Py_DECREF(sequence);
    if (entries && PyTuple_GET_SIZE(entries) != size) {
        PyErr_SetString(PyExc_ValueError, "compute returned a different number of entries");
        Py_CLEAR(entries);
    }
    return entries;
}

/* Twin of converters.cached_by_key: the entry of each value by its key; keys not cached are
 * computed once each, by compute(values, keys), from the first value holding them.
 * NOTE: the lists are read through tuples of our own: compute, an entry's nbytes, or a finalizer
 * run by a collection may change the caller's lists and the lists compute got. */
static PyObject *cache_lookup(CacheObject *self, PyObject *args) {
    PyObject *value_list, *key_list, *compute;
    if (!PyArg_ParseTuple(args, "O!O!O", &PyList_Type, &value_list, &PyList_Type, &key_list, &compute)) return NULL;
    if (PyList_GET_SIZE(value_list) != PyList_GET_SIZE(key_list)) {
        PyErr_SetString(PyExc_ValueError, "values and keys differ in length");
        return NULL;
    }
    PyObject *found = NULL, *todo = NULL, *computed = NULL, *todo_values = NULL, *todo_keys = NULL,
             *distinct_keys = NULL, *values = own_items(value_list), *keys = own_items(key_list);
    Py_ssize_t missing, n = keys ? PyTuple_GET_SIZE(keys) : 0;
    if (!values || !keys || !(found = found_entries(self, keys, &missing))) goto fail;
    if (!missing) goto done;
    todo = PyDict_New();
    if (!todo) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyList_GET_ITEM(found, i)) continue;
        if (PyDict_SetDefault(todo, PyTuple_GET_ITEM(keys, i), PyTuple_GET_ITEM(values, i)) == NULL) goto fail;
    }
    todo_keys = PyDict_Keys(todo);
    todo_values = PyDict_Values(todo);
    distinct_keys = todo_keys ? own_items(todo_keys) : NULL;
    if (!todo_values || !distinct_keys) goto fail;
    Py_ssize_t distinct = PyTuple_GET_SIZE(distinct_keys);
    computed = PyObject_CallFunctionObjArgs(compute, todo_values, todo_keys, NULL);
    if (!computed || unchanged(todo_keys, distinct) < 0) goto fail;
    Py_SETREF(computed, computed_entries(computed, distinct));
    if (!computed) goto fail;
    PyDict_Clear(todo);  /* now key -> computed entry */
    for (Py_ssize_t j = 0; j < distinct; j++) {
        PyObject *key = PyTuple_GET_ITEM(distinct_keys, j), *entry = PyTuple_GET_ITEM(computed, j);
        if (PyDict_SetItem(todo, key, entry) < 0 || cache_offer(self, key, entry) < 0) goto fail;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyList_GET_ITEM(found, i)) continue;
        PyObject *entry = PyDict_GetItemWithError(todo, PyTuple_GET_ITEM(keys, i));
        if (!entry) { if (!PyErr_Occurred()) PyErr_SetString(PyExc_KeyError, "entry lost"); goto fail; }
        PyList_SET_ITEM(found, i, Py_NewRef(entry));
    }
done:
    Py_DECREF(values);
    Py_DECREF(keys);
    Py_XDECREF(todo);
    Py_XDECREF(todo_keys);
    Py_XDECREF(todo_values);
    Py_XDECREF(distinct_keys);
    Py_XDECREF(computed);
    return found_done(found);
fail:
    if (found) found_release(found);
    Py_XDECREF(values);
    Py_XDECREF(keys);
    Py_XDECREF(todo);
    Py_XDECREF(todo_keys);
    Py_XDECREF(todo_values);
    Py_XDECREF(distinct_keys);
    Py_XDECREF(computed);
    return NULL;
}

/* Twin of converters.ValueCache.lookup_distinct: lookup for keys given once each (a field's
 * distinct values), so misses need no grouping by key: compute(missing keys) gives their entries. */
static PyObject *cache_lookup_distinct(CacheObject *self, PyObject *args) {
    PyObject *key_list, *compute;
    if (!PyArg_ParseTuple(args, "O!O", &PyList_Type, &key_list, &compute)) return NULL;
    PyObject *keys = own_items(key_list), *found = NULL, *todo = NULL, *missed = NULL, *computed = NULL;
    Py_ssize_t *misses = NULL, missing = 0;
    if (!keys || !(found = found_entries(self, keys, &missing))) goto fail;
    if (!missing) goto done;
    Py_ssize_t n = PyTuple_GET_SIZE(keys);
    todo = PyList_New(missing);
    misses = PyMem_Malloc(missing * sizeof *misses);
    if (!todo || !misses) { if (!misses) PyErr_NoMemory(); goto fail; }
    for (Py_ssize_t i = 0, j = 0; i < n; i++) {
        if (PyList_GET_ITEM(found, i)) continue;
        misses[j] = i;
        PyList_SET_ITEM(todo, j++, Py_NewRef(PyTuple_GET_ITEM(keys, i)));
    }
    missed = own_items(todo);  /* compute may keep and change todo */
    if (!missed) goto fail;
    computed = PyObject_CallOneArg(compute, todo);
    if (!computed || unchanged(todo, missing) < 0) goto fail;
    Py_SETREF(computed, computed_entries(computed, missing));
    if (!computed) goto fail;
    for (Py_ssize_t j = 0; j < missing; j++) {
        PyObject *entry = PyTuple_GET_ITEM(computed, j);
        if (cache_offer(self, PyTuple_GET_ITEM(missed, j), entry) < 0) goto fail;
        PyList_SET_ITEM(found, misses[j], Py_NewRef(entry));
    }
done:
    Py_DECREF(keys);
    Py_XDECREF(todo);
    Py_XDECREF(missed);
    Py_XDECREF(computed);
    PyMem_Free(misses);
    return found_done(found);
fail:
    if (found) found_release(found);
    Py_XDECREF(keys);
    Py_XDECREF(todo);
    Py_XDECREF(missed);
    Py_XDECREF(computed);
    PyMem_Free(misses);
    return NULL;
}

static Py_ssize_t cache_len(CacheObject *self) {
    return self->newer.used + self->older.used;
}

static PyObject *cache_nbytes(CacheObject *self, void *closure) {
    return PyLong_FromSsize_t(self->newer_bytes + self->older_bytes);
}

static int table_traverse(const CacheTable *t, visitproc visit, void *arg) {
    for (Py_ssize_t i = 0; i < t->size; i++) {
        Py_VISIT(t->slots[i].key);
        Py_VISIT(t->slots[i].entry);
    }
    return 0;
}

static int cache_traverse(CacheObject *self, visitproc visit, void *arg) {
    int failed = table_traverse(&self->newer, visit, arg);
    return failed ? failed : table_traverse(&self->older, visit, arg);
}

static int cache_clear_gc(CacheObject *self) {
    cache_forget(self);
    return 0;
}

static void cache_dealloc(CacheObject *self) {
    PyObject_GC_UnTrack(self);
    cache_clear_gc(self);
    PyMem_Free(self->seen);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef cache_methods[] = {
    {"get", (PyCFunction)cache_get, METH_O, "the entry of key, or None"},
    {"put", (PyCFunction)cache_put, METH_VARARGS, "remember key -> entry"},
    {"clear", (PyCFunction)cache_clear_method, METH_NOARGS, "forget everything"},
    {"lookup", (PyCFunction)cache_lookup, METH_VARARGS, "lookup(values, keys, compute): cached_by_key"},
    {"lookup_distinct", (PyCFunction)cache_lookup_distinct, METH_VARARGS,
     "lookup_distinct(keys, compute): lookup for keys given once each"},
    {NULL}};

static PyGetSetDef cache_getset[] = {
    {"nbytes", (getter)cache_nbytes, NULL, "bytes held (keys, entries and the values they name, estimated)", NULL},
    {NULL}};

static PySequenceMethods cache_as_sequence = {.sq_length = (lenfunc)cache_len};

static PyTypeObject CacheType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "logscore.features._native.Cache",
    .tp_basicsize = sizeof(CacheObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Cache(entries, max_bytes, doorkeeper=False): features of recently seen values (compiled twin of "
              "ValueCache; with doorkeeper, a computed value is stored the second time it is computed in a while).",
    .tp_new = cache_new,
    .tp_init = (initproc)cache_init,
    .tp_traverse = (traverseproc)cache_traverse,
    .tp_clear = (inquiry)cache_clear_gc,
    .tp_dealloc = (destructor)cache_dealloc,
    .tp_methods = cache_methods,
    .tp_getset = cache_getset,
    .tp_as_sequence = &cache_as_sequence,
};

/* ------------------------------------------------------------------ counted keys -> Features */

/* values as the producers take them: exact str or None (the record normalizer makes them so). */
static int check_values(PyObject *values) {
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(values); i++) {
        PyObject *value = PyTuple_GET_ITEM(values, i);
        if (value != Py_None && !PyUnicode_CheckExact(value)) {
            PyErr_Format(PyExc_TypeError, "values must be str or None (not a subclass); got %.100s",
                         Py_TYPE(value)->tp_name);
            return -1;
        }
    }
    return 0;
}

/* Weights as batch.term_weights(counts, weighting) * float32(weight): binary and tf here
 * (exact float32 products), log_tf through the Python weigher (numpy's float32 log). */
enum { WEIGH_BINARY = 0, WEIGH_TF = 1, WEIGH_OTHER = 2 };

typedef struct {
    Bytes keys;    /* int64 */
    Bytes counts;  /* float32 */
    Bytes bounds;  /* Py_ssize_t, one per value + 1 */
} Counted;

static void counted_take(Counted *c) {
    bytes_take(&c->keys);
    bytes_take(&c->counts);
    bytes_take(&c->bounds);
}

static void counted_free(Counted *c) {
    bytes_free(&c->keys);
    bytes_free(&c->counts);
    bytes_free(&c->bounds);
}

static int counted_bound(Counted *c) {
    Py_ssize_t end = c->keys.len / 8;
    return bytes_add(&c->bounds, &end, sizeof end);
}

static int counted_reserve(Counted *c, Py_ssize_t n) {
    return bytes_reserve(&c->keys, n * 8) < 0 || bytes_reserve(&c->counts, n * 4) < 0 ? -1 : 0;
}

static int counted_add(Counted *c, int64_t key, float count) {
    if (bytes_add(&c->keys, &key, 8) < 0) return -1;
    return bytes_add(&c->counts, &count, 4);
}

/* Features per value, from counted keys; values[i] is named by entry i (values: a tuple). */
static PyObject *counted_to_features(Counted *c, PyObject *values, PyObject *converter, int weighting,
                                     double weight, PyObject *weigher) {
    Py_ssize_t total = c->keys.len / 8, n = PyTuple_GET_SIZE(values);
    if (c->bounds.len != (n + 1) * (Py_ssize_t)sizeof(Py_ssize_t)) {
        PyErr_SetString(PyExc_ValueError, "need one value per text list or structure");
        return NULL;
    }
    const int64_t *keys = (const int64_t *)c->keys.data;
    const float *counts = (const float *)c->counts.data;
    const Py_ssize_t *bounds = (const Py_ssize_t *)c->bounds.data;
    const float scale = (float)weight;
    PyObject *weighed = NULL;
    Py_buffer view = {0};
    const void *weights = NULL;
    if (weighting == WEIGH_OTHER) {
        PyObject *array = array_of(counts, total * 4, dtype_float32);
        if (!array) return NULL;
        weighed = PyObject_CallOneArg(weigher, array);
        Py_DECREF(array);
        if (!weighed || PyObject_GetBuffer(weighed, &view, PyBUF_C_CONTIGUOUS) < 0) { Py_XDECREF(weighed); return NULL; }
        if (view.len != total * 4) {
            PyErr_SetString(PyExc_ValueError, "weigher must return one float32 per count");
            PyBuffer_Release(&view);
            Py_DECREF(weighed);
            return NULL;
        }
        weights = view.buf;
    }
    PyObject *out = PyList_New(n);
    if (!out) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t a = bounds[i], b = bounds[i + 1];
        FeaturesObject *f = features_new(b - a, converter, PyTuple_GET_ITEM(values, i));
        if (!f) { Py_CLEAR(out); goto done; }
        if (b > a) memcpy(FEATURES_KEYS(f), keys + a, (b - a) * 8);
        float *w = FEATURES_WEIGHTS(f);
        for (Py_ssize_t k = a; k < b; k++)
            w[k - a] = weighting == WEIGH_BINARY ? scale : weighting == WEIGH_TF ? counts[k] * scale : load_f32(weights, k);
        PyList_SET_ITEM(out, i, (PyObject *)f);
    }
done:
    if (weighed) { PyBuffer_Release(&view); Py_DECREF(weighed); }
    return out;
}

/* Texts compared while counting a value's features (each text a counter's probe meets), since the
 * module loaded: comparisons() tells it, so tests can hold
 * the counting of a value linear in its texts (a rescan of earlier ones made it quadratic). */
static unsigned long long text_comparisons;

/* Counting texts as collections.Counter does (first occurrence order), hashed with crc32.
 * NOTE: crc32 is affine in a text's bits, so texts sharing one key are easy to make on purpose (166 path
 * segments of one key made 13,919 comparisons a URL, 223,530 for 667). The table by key holds only the
 * first text of each key; a different text of a key already there goes to a second table, probed by
 * Python's bytes hash (seeded like a dict's), so such a set costs a probe or two a text. Elsewhere two
 * texts share a key about once in 4 billion pairs: the second table stays empty. */
typedef struct {
    uint32_t key;
    Py_ssize_t offset, length;
    float count;
    int spilled;  /* in the second table (an earlier, different text has its key) */
} Slot;

typedef struct {
    Py_hash_t hash;
    Py_ssize_t slot;  /* -1 = empty */
} SpillSlot;

typedef struct {
    Bytes arena;   /* this value's texts, back to back */
    Slot *slots;
    Py_ssize_t used, cap;
    Py_ssize_t *table;  /* open addressing over slots by key, one slot a key; -1 = empty */
    Py_ssize_t table_size;
    SpillSlot *spill;  /* the texts whose key an earlier one has, by bytes hash; NULL until one comes */
    Py_ssize_t spill_size, spill_used;
    uint32_t seed;
} Counter;

static void counter_reset(Counter *c) {
    c->arena.len = 0;
    c->used = 0;
    if (c->table) for (Py_ssize_t i = 0; i < c->table_size; i++) c->table[i] = -1;
    if (c->spill_used) for (Py_ssize_t i = 0; i < c->spill_size; i++) c->spill[i].slot = -1;
    c->spill_used = 0;
}

static void counter_free(Counter *c) {
    bytes_free(&c->arena);
    PyMem_Free(c->slots);
    PyMem_Free(c->table);
    PyMem_Free(c->spill);
}

static int counter_grow(Counter *c) {
    Py_ssize_t cap = c->cap ? c->cap * 2 : 64;
    Slot *slots = PyMem_Realloc(c->slots, cap * sizeof(Slot));
    Py_ssize_t *table = PyMem_Realloc(c->table, cap * 2 * sizeof(Py_ssize_t));
    if (!slots || !table) {
        if (slots) c->slots = slots;
        if (table) c->table = table;
        PyErr_NoMemory();
        return -1;
    }
    c->slots = slots;
    c->table = table;
    c->cap = cap;
    c->table_size = cap * 2;
    for (Py_ssize_t i = 0; i < c->table_size; i++) c->table[i] = -1;
    for (Py_ssize_t s = 0; s < c->used; s++) {
        if (c->slots[s].spilled) continue;
        Probe p = probe_start(c->slots[s].key, (size_t)c->table_size - 1);
        while (c->table[p.at] >= 0) probe_next(&p);
        c->table[p.at] = s;
    }
    return 0;
}

/* Room in the second table for one text more, at most half of it used (probes stay short). */
static int spill_reserve(Counter *c) {
    if ((c->spill_used + 1) * 2 <= c->spill_size) return 0;
    Py_ssize_t size = c->spill_size ? c->spill_size * 2 : 64;
    SpillSlot *spill = PyMem_Malloc(size * sizeof(SpillSlot));
    if (!spill) { PyErr_NoMemory(); return -1; }
    for (Py_ssize_t i = 0; i < size; i++) spill[i].slot = -1;
    for (Py_ssize_t i = 0; i < c->spill_size; i++) {
        if (c->spill[i].slot < 0) continue;
        Probe p = probe_start((size_t)c->spill[i].hash, (size_t)size - 1);
        while (spill[p.at].slot >= 0) probe_next(&p);
        spill[p.at] = c->spill[i];
    }
    PyMem_Free(c->spill);
    c->spill = spill;
    c->spill_size = size;
    return 0;
}

static int same_text(const Counter *c, const Slot *s, Py_ssize_t start, Py_ssize_t length) {
    return s->length == length && memcmp(c->arena.data + s->offset, c->arena.data + start, length) == 0;
}

/* counter_add for a text whose key an earlier, different text has: found or stored in the second table. */
static int counter_spill(Counter *c, Py_ssize_t start, uint32_t key, float repeat) {
    if (spill_reserve(c) < 0) return -1;
    Py_ssize_t length = c->arena.len - start;
    /* Python's bytes hash (seeded per process, as a dict's), through a bytes object: only texts whose
       crc32 an earlier, different text has come here, and the private _Py_HashBytes is no stable API */
    PyObject *text = PyBytes_FromStringAndSize((const char *)c->arena.data + start, length);
    if (text == NULL) return -1;
    Py_hash_t hash = PyObject_Hash(text);
    Py_DECREF(text);
    if (hash == -1) return -1;
    Probe p = probe_start((size_t)hash, (size_t)c->spill_size - 1);
    for (; c->spill[p.at].slot >= 0; probe_next(&p)) {
        Slot *s = &c->slots[c->spill[p.at].slot];
        text_comparisons++;
        if (c->spill[p.at].hash == hash && same_text(c, s, start, length)) {
            s->count += repeat;
            c->arena.len = start;
            return 0;
        }
    }
    c->spill[p.at] = (SpillSlot){hash, c->used};
    c->spill_used++;
    c->slots[c->used++] = (Slot){key, start, length, 1.0f, 1};
    return 0;
}

/* The text is the arena from `start` to its end: count it once, or drop it as a repeat, adding
 * `repeat` to the count of the text already there (0: a text counted once however often it comes,
 * as dict.fromkeys keeps it). */
static int counter_add(Counter *c, Py_ssize_t start, float repeat) {
    if (c->used >= c->cap && counter_grow(c) < 0) return -1;
    Py_ssize_t length = c->arena.len - start;
    uint32_t key = crc32_update(c->seed, (const unsigned char *)c->arena.data + start, length);
    Probe p = probe_start(key, (size_t)c->table_size - 1);
    for (; c->table[p.at] >= 0; probe_next(&p)) {
        Slot *s = &c->slots[c->table[p.at]];
        text_comparisons++;
        if (s->key != key) continue;
        if (!same_text(c, s, start, length)) return counter_spill(c, start, key, repeat);
        s->count += repeat;
        c->arena.len = start;
        return 0;
    }
    c->table[p.at] = c->used;
    c->slots[c->used++] = (Slot){key, start, length, 1.0f, 0};
    return 0;
}

static int counter_commit(Counter *c, Py_ssize_t start) {
    return counter_add(c, start, 1.0f);
}

static int counter_emit(Counter *c, Counted *out) {
    for (Py_ssize_t s = 0; s < c->used; s++)
        if (counted_add(out, (int64_t)c->slots[s].key, c->slots[s].count) < 0) return -1;
    return counted_bound(out);
}

static int parse_weighting(PyObject *weigher, int *weighting) {
    if (PyLong_Check(weigher)) {
        *weighting = (int)PyLong_AsLong(weigher);
        return *weighting == WEIGH_BINARY || *weighting == WEIGH_TF ? 0 : -1;
    }
    *weighting = WEIGH_OTHER;
    return PyCallable_Check(weigher) ? 0 : -1;
}

#define WEIGHER_HELP "weigher: 0 (binary), 1 (tf) or a callable float32 counts -> float32 weights"

/* The checks every producer of Features makes on its weigher and converter reference. */
static int check_producer(PyObject *weigher, PyObject *converter, int *weighting) {
    if (parse_weighting(weigher, weighting) < 0) {
        PyErr_SetString(PyExc_TypeError, WEIGHER_HELP);
        return -1;
    }
    return check_converter_ref(converter);
}

/* Buffers for counting feature texts, from the pool; counted holds its first bound. */
static int counting_take(Counted *counted, Counter *counter, unsigned int seed) {
    counted_take(counted);
    *counter = (Counter){.seed = seed};
    bytes_take(&counter->arena);
    return counted_bound(counted);
}

/* text_features(values, texts, seed, weight, weigher, converter): Converter._hash. */
static PyObject *text_features(PyObject *module, PyObject *args) {
    PyObject *values, *texts, *weigher, *converter;
    unsigned int seed;
    double weight;
    int weighting;
    if (!PyArg_ParseTuple(args, "O!O!IdOO", &PyList_Type, &values, &PyList_Type, &texts, &seed, &weight,
                          &weigher, &converter))
        return NULL;
    if (check_producer(weigher, converter, &weighting) < 0) return NULL;
    Counted counted;
    Counter counter;
    PyObject *result = NULL;
    /* our own: the texts' iterators and the weigher run Python code */
    values = own_items(values);
    texts = values ? own_items(texts) : NULL;
    if (counting_take(&counted, &counter, seed) < 0 || !texts) goto done;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(texts); i++) {
        PyObject *iterator = PyObject_GetIter(PyTuple_GET_ITEM(texts, i));
        if (!iterator) goto done;
        counter_reset(&counter);
        PyObject *text;
        while ((text = PyIter_Next(iterator))) {
            int ok = PyUnicode_CheckExact(text) ? 0 : -1;
            if (ok < 0) PyErr_SetString(PyExc_TypeError, "feature texts must be str (not a subclass)");
            Py_ssize_t start = counter.arena.len;
            if (ok == 0) ok = utf8_add_str(&counter.arena, text);
            if (ok == 0) ok = counter_commit(&counter, start);
            Py_DECREF(text);
            if (ok < 0) { Py_DECREF(iterator); goto done; }
        }
        Py_DECREF(iterator);
        if (PyErr_Occurred() || counter_emit(&counter, &counted) < 0) goto done;
    }
    result = counted_to_features(&counted, values, converter, weighting, weight, weigher);
done:
    counted_free(&counted);
    counter_free(&counter);
    Py_XDECREF(values);
    Py_XDECREF(texts);
    return result;
}

/* ------------------------------------------------------------------ percent decoding, shapes */

static int hex_value(Py_UCS4 c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* One urllib.parse.unquote_plus(text, errors="replace"): '+' -> ' ', then each maximal run of
 * ASCII is percent-decoded to bytes and decoded as UTF-8 with "replace"; other characters
 * pass through. */
static int unquote_plus_once(const Text *in, Text *out, Bytes *scratch) {
    out->len = 0;
    if (text_reserve(out, in->len) < 0) return -1;
    Py_ssize_t i = 0, n = in->len;
    while (i < n) {
        if (in->data[i] >= 0x80) {
            out->data[out->len++] = in->data[i++];
            continue;
        }
        scratch->len = 0;
        if (bytes_reserve(scratch, n - i) < 0) return -1;  /* decoding never lengthens */
        unsigned char *bytes = (unsigned char *)scratch->data;
        int high = 0;
        while (i < n && in->data[i] < 0x80) {
            Py_UCS4 c = in->data[i];
            int a, b;
            if (c == '%' && i + 2 < n && (a = hex_value(in->data[i + 1])) >= 0 &&
                (b = hex_value(in->data[i + 2])) >= 0) {
                unsigned char byte = (unsigned char)(a * 16 + b);
                high |= byte >= 0x80;
                bytes[scratch->len++] = byte;
                i += 3;
            } else {
                bytes[scratch->len++] = c == '+' ? ' ' : (unsigned char)c;
                i++;
            }
        }
        if (!high) {
            if (text_reserve(out, out->len + scratch->len + (n - i)) < 0) return -1;
            for (Py_ssize_t k = 0; k < scratch->len; k++) out->data[out->len++] = (unsigned char)scratch->data[k];
        } else {
            PyObject *decoded = PyUnicode_DecodeUTF8(scratch->data, scratch->len, "replace");
            if (!decoded) return -1;
            Py_ssize_t m = PyUnicode_GET_LENGTH(decoded);
            if (text_reserve(out, out->len + m + (n - i)) < 0) { Py_DECREF(decoded); return -1; }
            int kind = PyUnicode_KIND(decoded);
            const void *data = PyUnicode_DATA(decoded);
            for (Py_ssize_t k = 0; k < m; k++) out->data[out->len++] = PyUnicode_READ(kind, data, k);
            Py_DECREF(decoded);
        }
    }
    return 0;
}

static int text_has(const Text *t, Py_UCS4 a, Py_UCS4 b) {
    Py_ssize_t i = 0;
#if defined(__SSE2__)
    const __m128i wanted_a = _mm_set1_epi32((int)a), wanted_b = _mm_set1_epi32((int)b);
    for (; i + 4 <= t->len; i += 4) {
        __m128i four = _mm_loadu_si128((const __m128i *)(t->data + i));
        if (_mm_movemask_epi8(_mm_or_si128(_mm_cmpeq_epi32(four, wanted_a), _mm_cmpeq_epi32(four, wanted_b))))
            return 1;
    }
#endif
    for (; i < t->len; i++)
        if (t->data[i] == a || t->data[i] == b) return 1;
    return 0;
}

/* converters.percent_decode: decode in place at most max_rounds times; returns the rounds. */
static int percent_decode(Text *t, int max_rounds, Text *spare, Bytes *scratch) {
    int rounds = 0;
    while (rounds < max_rounds && text_has(t, '%', '+')) {
        if (unquote_plus_once(t, spare, scratch) < 0) return -1;
        if (spare->len == t->len && memcmp(spare->data, t->data, t->len * sizeof(Py_UCS4)) == 0) break;
        Text swap = *t;
        *t = *spare;
        *spare = swap;
        rounds++;
    }
    return rounds;
}

/* converters.value_shape without the length cut: ASCII letters -> 'a', digits -> '9', runs of
 * one character collapsed. */
static Py_UCS4 ascii_shape[128];  /* ASCII code point -> its class ('a', '9' or itself), made at import */

static void shape_init(void) {
    for (Py_UCS4 c = 0; c < 128; c++)
        ascii_shape[c] = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ? 'a' : c >= '0' && c <= '9' ? '9' : c;
}

static int shape_of(const Py_UCS4 *data, Py_ssize_t n, Text *out) {
    out->len = 0;
    if (text_reserve(out, n) < 0) return -1;
    Py_UCS4 *shaped = out->data, previous = 0xFFFFFFFFu;  /* no code point */
    Py_ssize_t length = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 c = data[i] < 128 ? ascii_shape[data[i]] : data[i];
        if (c == previous) continue;
        shaped[length++] = previous = c;
    }
    out->len = length;
    return 0;
}

#define MAX_SHAPE 48
#define MAX_EXACT_SHAPE 12

/* ------------------------------------------------------------------ n-grams */

/* encoded[:max_bytes] (a negative max_bytes as Python reads it) after the start byte, then the end byte. */
static int encoded_end(Bytes *encoded, Py_ssize_t max_bytes) {
    Py_ssize_t body = encoded->len - 1;
    Py_ssize_t keep = max_bytes >= 0 ? (body < max_bytes ? body : max_bytes)
                                     : (body + max_bytes > 0 ? body + max_bytes : 0);
    encoded->len = 1 + keep;
    return bytes_byte(encoded, 3);
}

/* Whether percent-decoding would read an ASCII str at all ('%' or '+' in it). */
static int ascii_has_escapes(PyObject *ascii) {
    const void *data = PyUnicode_1BYTE_DATA(ascii);
    Py_ssize_t n = PyUnicode_GET_LENGTH(ascii);
    return memchr(data, '%', n) != NULL || memchr(data, '+', n) != NULL;
}

/* The encoding of an ASCII value that decoding leaves as it is (most URLs), from its bytes: not
 * widened to code points and encoded back to UTF-8 as other values are. */
static int encode_ascii(PyObject *ascii, int lowercase, int shape, Bytes *encoded) {
    const unsigned char *p = PyUnicode_1BYTE_DATA(ascii);
    Py_ssize_t n = PyUnicode_GET_LENGTH(ascii);
    encoded->len = 0;
    if (bytes_reserve(encoded, n + 2) < 0) return -1;
    unsigned char *out = (unsigned char *)encoded->data;
    Py_ssize_t m = 0;
    out[m++] = 2;
    if (shape) {  /* lowercasing first changes no shape */
        int previous = -1;
        for (Py_ssize_t i = 0; i < n; i++) {
            int c = (int)ascii_shape[p[i]];
            if (c != previous) out[m++] = (unsigned char)(previous = c);
        }
    } else if (lowercase) {
        for (Py_ssize_t i = 0; i < n; i++) out[m++] = p[i] >= 'A' && p[i] <= 'Z' ? p[i] + 32 : p[i];
    } else {
        memcpy(out + m, p, n);
        m += n;
    }
    encoded->len = m;
    return 0;
}

/* ngram_encode(values, decode, lowercase, shape, max_bytes): NgramConverter._encode. */
static PyObject *ngram_encode(PyObject *module, PyObject *args) {
    PyObject *values;
    int decode, lowercase, shape;
    Py_ssize_t max_bytes;
    if (!PyArg_ParseTuple(args, "O!pppn", &PyList_Type, &values, &decode, &lowercase, &shape, &max_bytes))
        return NULL;
    values = own_items(values);  /* str.lower() and allocations run Python code (a collection's finalizers) */
    if (!values) return NULL;
    if (check_values(values) < 0) { Py_DECREF(values); return NULL; }
    Py_ssize_t n = PyTuple_GET_SIZE(values);
    PyObject *out = hidden_list(n);
    if (!out) { Py_DECREF(values); return NULL; }
    Text text, spare, shaped;
    Bytes scratch, encoded;
    text_take(&text); text_take(&spare); text_take(&shaped); bytes_take(&scratch); bytes_take(&encoded);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *value = PyTuple_GET_ITEM(values, i);
        PyObject *item;
        if (value == Py_None) {
            item = PyBytes_FromStringAndSize("\x02\x00\x03", 3);
        } else if (PyUnicode_IS_ASCII(value) && !(decode && ascii_has_escapes(value))) {
            if (encode_ascii(value, lowercase, shape, &encoded) < 0 || encoded_end(&encoded, max_bytes) < 0) goto fail;
            item = PyBytes_FromStringAndSize(encoded.data, encoded.len);
        } else {
            if (text_from_str(&text, value) < 0) goto fail;
            if (decode && percent_decode(&text, 3, &spare, &scratch) < 0) goto fail;
            if (lowercase) {
                int ascii = 1;
                for (Py_ssize_t k = 0; k < text.len && ascii; k++) ascii = text.data[k] < 0x80;
                if (ascii) {
                    for (Py_ssize_t k = 0; k < text.len; k++)
                        if (text.data[k] >= 'A' && text.data[k] <= 'Z') text.data[k] += 32;
                } else {  /* Unicode case mapping: exactly str.lower() */
                    PyObject *s = text_to_str(text.data, text.len);
                    PyObject *lower = s ? PyObject_CallMethod(s, "lower", NULL) : NULL;
                    Py_XDECREF(s);
                    if (!lower) goto fail;
                    int ok = text_from_str(&text, lower);
                    Py_DECREF(lower);
                    if (ok < 0) goto fail;
                }
            }
            if (shape) {
                if (shape_of(text.data, text.len, &shaped) < 0 || text_set(&text, shaped.data, shaped.len) < 0)
                    goto fail;
            }
            encoded.len = 0;
            if (bytes_byte(&encoded, 2) < 0 || utf8_add(&encoded, text.data, text.len) < 0 ||
                encoded_end(&encoded, max_bytes) < 0)
                goto fail;
            item = PyBytes_FromStringAndSize(encoded.data, encoded.len);
        }
        if (!item) goto fail;
        PyList_SET_ITEM(out, i, item);
    }
    text_free(&text); text_free(&spare); text_free(&shaped); bytes_free(&scratch); bytes_free(&encoded);
    Py_DECREF(values);
    return shown(out);
fail:
    text_free(&text); text_free(&spare); text_free(&shaped); bytes_free(&scratch); bytes_free(&encoded);
    Py_DECREF(values);
    Py_DECREF(out);
    return NULL;
}

/* Ascending sort of 32-bit keys through `spare` (as long). Up to RADIX_FROM keys: one pass on
 * their top bits into about as many buckets as keys (they are uniform hashes, so a bucket holds
 * a key or two), then an insertion sort finishes each bucket. NOTE: the buckets scale with n:
 * 256 of them for a URL's ~75 windows made summing the bucket counts cost more than the sort.
 * More keys: least-significant-digit radix sort, a byte a pass; the buckets grow with the value
 * (a 64 KiB value took 0.16 s), the passes do not, but they cost twice as much on the short
 * values most fields hold. (qsort's callback cost more than hashing.) */
#define RADIX_FROM 4096
static void sort_keys(uint32_t *a, uint32_t *spare, Py_ssize_t n) {
    if (n > RADIX_FROM) {
        uint32_t *from = a, *to = spare;
        for (int shift = 0; shift < 32; shift += 8) {
            Py_ssize_t next[256] = {0};
            for (Py_ssize_t i = 0; i < n; i++) next[(from[i] >> shift) & 255]++;
            Py_ssize_t start = 0;
            for (int b = 0; b < 256; b++) { Py_ssize_t count = next[b]; next[b] = start; start += count; }
            for (Py_ssize_t i = 0; i < n; i++) to[next[(from[i] >> shift) & 255]++] = from[i];
            uint32_t *swap = from; from = to; to = swap;
        }
        return;  /* four passes: the keys are back in a */
    }
    if (n > 32) {
        int bits = 5;  /* buckets: the power of two at or below n, at most 256 */
        while (bits < 8 && (Py_ssize_t)2 << bits <= n) bits++;
        const int shift = 32 - bits;
        uint32_t next[257];  /* n <= RADIX_FROM fits */
        memset(next, 0, ((1 << bits) + 1) * sizeof *next);
        for (Py_ssize_t i = 0; i < n; i++) next[(a[i] >> shift) + 1]++;
        for (int b = 1; b < 1 << bits; b++) next[b] += next[b - 1];
        for (Py_ssize_t i = 0; i < n; i++) spare[next[a[i] >> shift]++] = a[i];
        memcpy(a, spare, n * sizeof *a);
    }
    for (Py_ssize_t i = 1; i < n; i++) {  /* each key is at most a bucket away from its place */
        uint32_t v = a[i];
        Py_ssize_t j = i;
        while (j > 0 && a[j - 1] > v) { a[j] = a[j - 1]; j--; }
        a[j] = v;
    }
}

/* ngram_features(values, encoded, seed, low, high, weight, weigher, converter):
 * NgramConverter._featurize_encoded: per value its distinct window keys, ascending, counted. */
static PyObject *ngram_features(PyObject *module, PyObject *args) {
    PyObject *values, *encoded, *weigher, *converter;
    unsigned long long seed;
    int low, high, weighting;
    double weight;
    if (!PyArg_ParseTuple(args, "O!O!KiidOO", &PyList_Type, &values, &PyList_Type, &encoded, &seed, &low, &high,
                          &weight, &weigher, &converter))
        return NULL;
    if (check_producer(weigher, converter, &weighting) < 0) return NULL;
    if (low < 1 || high < low || high > 8 || PyList_GET_SIZE(values) != PyList_GET_SIZE(encoded)) {
        PyErr_SetString(PyExc_ValueError, "need 1 <= low <= high <= 8 and one encoding per value");
        return NULL;
    }
    const uint64_t prime = 0x100000001B3ull, mix = 0xBF58476D1CE4E5B9ull;
    Counted counted;
    counted_take(&counted);
    Bytes windows;
    bytes_take(&windows);
    PyObject *result = NULL;
    values = own_items(values);  /* the weigher runs Python code */
    if (!values || counted_bound(&counted) < 0) goto done;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(encoded); i++) {
        PyObject *item = PyList_GET_ITEM(encoded, i);
        if (!PyBytes_CheckExact(item)) { PyErr_SetString(PyExc_TypeError, "encodings must be bytes"); goto done; }
        const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(item);
        Py_ssize_t length = PyBytes_GET_SIZE(item);
        windows.len = 0;
        Py_ssize_t most = (length + 1) * (high - low + 1);
        if (bytes_reserve(&windows, most * 8) < 0) goto done;
        uint32_t *w = (uint32_t *)windows.data;
        Py_ssize_t count = 0;
        /* A window's hash, (seed * 8 + size) * prime^size + its bytes as a polynomial in prime
         * (mod 2^64, as the reference computes it byte by byte), is rolled from the previous
         * window's: drop the first byte's term, shift, add the next byte. */
        for (int size = low; size <= high && size <= length; size++) {
            uint64_t first_power = 1, polynomial = 0;  /* prime^(size - 1); the first window's bytes */
            for (int k = 1; k < size; k++) first_power *= prime;
            const uint64_t base = (seed * 8 + (uint64_t)size) * first_power * prime;
            for (int k = 0; k < size; k++) polynomial = polynomial * prime + p[k];
            for (Py_ssize_t start = 0;; start++) {
                uint64_t h = base + polynomial;
                h ^= h >> 29;
                h *= mix;
                w[count++] = (uint32_t)(h >> 32);
                if (start + size >= length) break;
                polynomial = (polynomial - p[start] * first_power) * prime + p[start + size];
            }
        }
        sort_keys(w, w + most, count);
        if (counted_reserve(&counted, count) < 0) goto done;
        int64_t *keys_out = (int64_t *)(counted.keys.data + counted.keys.len);
        float *counts_out = (float *)(counted.counts.data + counted.counts.len);
        Py_ssize_t kept = 0;
        for (Py_ssize_t k = 0; k < count;) {
            Py_ssize_t run = k + 1;
            while (run < count && w[run] == w[k]) run++;
            keys_out[kept] = (int64_t)w[k];
            counts_out[kept++] = (float)(run - k);
            k = run;
        }
        counted.keys.len += kept * 8;
        counted.counts.len += kept * 4;
        if (counted_bound(&counted) < 0) goto done;
    }
    result = counted_to_features(&counted, values, converter, weighting, weight, weigher);
done:
    counted_free(&counted);
    bytes_free(&windows);
    Py_XDECREF(values);
    return result;
}

/* ------------------------------------------------------------------ URL structure */

/* Markers of the structure key: bytes UTF-8 never holds. */
#define MARK_FLAG 0xF8
#define MARK_TEMPLATE 0xF9
#define MARK_PARAM 0xFA
#define MARK_FIELD 0xFB
#define MARK_NO_ENUM 0xFC

/* _ID_SEGMENT.fullmatch on characters a..b of a string's data: \d+ (Unicode decimals) |
 * [0-9a-fA-F]{8,} | a UUID. Reads any PyUnicode kind (a Py_UCS4 buffer is kind 4). */
static inline Py_ALWAYS_INLINE int is_id_span(int kind, const void *data, Py_ssize_t a, Py_ssize_t b) {
    Py_ssize_t n = b - a;
    if (n <= 0) return 0;
    int decimal = 1, hex = 1;
    for (Py_ssize_t i = a; i < b; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        decimal &= c < 0x80 ? (c >= '0' && c <= '9') : (Py_UNICODE_ISDECIMAL(c) ? 1 : 0);
        hex &= c < 0x80 && hex_value(c) >= 0;
    }
    if (decimal || (hex && n >= 8)) return 1;
    if (n != 36) return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, a + i);
        int dash = i == 8 || i == 13 || i == 18 || i == 23;
        if (dash ? c != '-' : !(c < 0x80 && hex_value(c) >= 0)) return 0;
    }
    return 1;
}

static int is_id_segment(const Py_UCS4 *s, Py_ssize_t n) { return is_id_span(PyUnicode_4BYTE_KIND, s, 0, n); }

static int add_decimal(Bytes *b, long long v) {  /* v >= 0 */
    char digits[24];
    int n = 0;
    do { digits[sizeof digits - 1 - n++] = (char)('0' + v % 10); v /= 10; } while (v);
    return bytes_add(b, digits + sizeof digits - n, n);
}

static int bit_length(Py_ssize_t n) {
    int bits = 0;
    while (n) { bits++; n >>= 1; }
    return bits;
}

typedef struct {
    Text path, query, spare, piece, name, value, shape, template_;
    Bytes scratch, key, params;
} UrlWork;

static void url_work_take(UrlWork *w) {
    text_take(&w->path); text_take(&w->query); text_take(&w->spare); text_take(&w->piece);
    text_take(&w->name); text_take(&w->value); text_take(&w->shape); text_take(&w->template_);
    bytes_take(&w->scratch); bytes_take(&w->key); bytes_take(&w->params);
}

static void url_work_free(UrlWork *w) {
    text_free(&w->path); text_free(&w->query); text_free(&w->spare); text_free(&w->piece);
    text_free(&w->name); text_free(&w->value); text_free(&w->shape); text_free(&w->template_);
    bytes_free(&w->scratch); bytes_free(&w->key); bytes_free(&w->params);
}

static Py_ssize_t find_char(const Py_UCS4 *s, Py_ssize_t from, Py_ssize_t n, Py_UCS4 c) {
    for (Py_ssize_t i = from; i < n; i++)
        if (s[i] == c) return i;
    return -1;
}

/* The templates some enumerated slot starts with, found by a hash of their code points: making a
 * str of each URL's template for a set lookup cost more than the rest of its parameters. The
 * templates are a model's few and fixed, so a plain hash is enough: a crafted URL can at worst be
 * compared with each of them. */
typedef struct {
    PyObject *strs;  /* a tuple of exact strs, ours */
    Py_ssize_t *slots;  /* index into strs, -1 where free */
    Py_ssize_t size;  /* a power of two, at least twice the strs */
} TemplateSet;

static uint64_t code_points_hash(int kind, const void *data, Py_ssize_t n) {
    uint64_t h = 0xcbf29ce484222325u;  /* FNV-1a over code points */
    for (Py_ssize_t i = 0; i < n; i++) h = (h ^ PyUnicode_READ(kind, data, i)) * 0x100000001b3u;
    return h;
}

static int same_code_points(PyObject *str, const Py_UCS4 *s, Py_ssize_t n) {
    if (PyUnicode_GET_LENGTH(str) != n) return 0;
    int kind = PyUnicode_KIND(str);
    const void *data = PyUnicode_DATA(str);
    for (Py_ssize_t i = 0; i < n; i++)
        if (PyUnicode_READ(kind, data, i) != s[i]) return 0;
    return 1;
}

static void template_set_free(TemplateSet *t) {
    Py_CLEAR(t->strs);
    PyMem_Free(t->slots);
    t->slots = NULL;
}

static int template_set_make(TemplateSet *t, PyObject *templates) {
    t->slots = NULL;
    t->strs = PySequence_Tuple(templates);
    if (!t->strs) return -1;
    Py_ssize_t count = PyTuple_GET_SIZE(t->strs);
    for (t->size = 8; t->size < 2 * count; t->size *= 2) {}
    t->slots = PyMem_Malloc(t->size * sizeof *t->slots);
    if (!t->slots) { PyErr_NoMemory(); template_set_free(t); return -1; }
    for (Py_ssize_t i = 0; i < t->size; i++) t->slots[i] = -1;
    for (Py_ssize_t j = 0; j < count; j++) {
        PyObject *str = PyTuple_GET_ITEM(t->strs, j);
        if (!PyUnicode_Check(str)) {  /* (a subclass's own __eq__ is not asked: its code points are compared) */
            PyErr_Format(PyExc_TypeError, "enumerated templates must be str; got %.100s", Py_TYPE(str)->tp_name);
            template_set_free(t);
            return -1;
        }
        Probe p = probe_start(code_points_hash(PyUnicode_KIND(str), PyUnicode_DATA(str), PyUnicode_GET_LENGTH(str)),
                              (size_t)t->size - 1);
        while (t->slots[p.at] >= 0) probe_next(&p);
        t->slots[p.at] = j;
    }
    return 0;
}

static int template_set_has(const TemplateSet *t, const Py_UCS4 *s, Py_ssize_t n) {
    for (Probe p = probe_start(code_points_hash(PyUnicode_4BYTE_KIND, s, n), (size_t)t->size - 1);; probe_next(&p)) {
        Py_ssize_t j = t->slots[p.at];
        if (j < 0) return 0;
        if (same_code_points(PyTuple_GET_ITEM(t->strs, j), s, n)) return 1;
    }
}

/* UrlConverter._split + _structure of one URL, as a bytes key holding all its features
 * depend on: flags, template, per parameter its name, shape, enumerated value, length class.
 * enumerated_templates: every "{template}" that some enumerated "{template}?{name}" starts
 * with, so that a URL whose template none starts with (most) is looked up once there, by its
 * code points, and its parameters never in the enumerated set. */
static int url_structure(PyObject *value, int full, int rounds_allowed, PyObject *enumerated,
                         const TemplateSet *enumerated_templates, UrlWork *w) {
    Text *path = &w->path, *query = &w->query;
    Bytes *key = &w->key;
    key->len = 0;
    if (text_from_str(&w->piece, value) < 0) return -1;
    const Py_UCS4 *s = w->piece.data;
    Py_ssize_t n = w->piece.len;
    int path_flag = 0;
    if (full) {
        Py_ssize_t q = find_char(s, 0, n, '?');
        Py_ssize_t path_end = q < 0 ? n : q;
        if (text_set(path, s, path_end) < 0) return -1;
        if (q < 0) query->len = 0;
        else if (text_set(query, s + q + 1, n - q - 1) < 0) return -1;
        /* "://" in path[:12]: only a scheme that ends within the first 12 characters counts, so
         * the rest of a long path is not searched */
        Py_ssize_t scheme = -1, scheme_within = path->len < 12 ? path->len : 12;
        for (Py_ssize_t i = 0; i + 3 <= scheme_within; i++)
            if (path->data[i] == ':' && path->data[i + 1] == '/' && path->data[i + 2] == '/') { scheme = i; break; }
        if (scheme >= 0 && scheme + 3 <= 12) {
            Py_ssize_t after = scheme + 3;
            Py_ssize_t slash = find_char(path->data, after, path->len, '/');
            Py_ssize_t rest = slash < 0 ? path->len : slash + 1;
            Py_ssize_t m = path->len - rest;
            memmove(path->data + 1, path->data + rest, m * sizeof(Py_UCS4));
            path->data[0] = '/';
            path->len = m + 1;
        }
        int rounds = percent_decode(path, rounds_allowed, &w->spare, &w->scratch);
        if (rounds < 0) return -1;
        path_flag = rounds > 1;
    } else {
        path->len = 0;
        if (text_set(query, s, n) < 0) return -1;
    }
    if (path_flag) {
        if (bytes_byte(key, MARK_FLAG) < 0 || bytes_str(key, "path encoded more than once") < 0) return -1;
    }
    /* template: "/".join(mask_segment(s) for s in path.split("/")) */
    Text *template_ = &w->template_;
    template_->len = 0;
    /* room for the longest template once (a masked segment, at least one character, grows by at
     * most 3 as "{id}"), so each character is written without a check */
    if (text_reserve(template_, 4 * (path->len + 1)) < 0) return -1;
    Py_UCS4 *written = template_->data;
    for (Py_ssize_t start = 0;;) {
        Py_ssize_t end = find_char(path->data, start, path->len, '/');
        if (end < 0) end = path->len;
        if (start > 0) *written++ = '/';
        if (is_id_segment(path->data + start, end - start)) {
            static const Py_UCS4 id[] = {'{', 'i', 'd', '}'};
            memcpy(written, id, sizeof id);
            written += 4;
        } else if (end > start) {
            memcpy(written, path->data + start, (end - start) * sizeof(Py_UCS4));
            written += end - start;
        }
        if (end >= path->len) break;
        start = end + 1;
    }
    template_->len = written - template_->data;
    /* parameters: flags go to the key first, the parameters after the template */
    Bytes *params = &w->params;
    params->len = 0;
    int maybe_enumerated = 0;
    /* NOTE: a parameter without '=' (an empty value) can be enumerated too */
    if (PySet_GET_SIZE(enumerated) > 0 && query->len > 0) {
        maybe_enumerated = template_set_has(enumerated_templates, template_->data, template_->len);
    }
    for (Py_ssize_t start = 0; start < query->len;) {
        Py_ssize_t end = start;
        while (end < query->len && query->data[end] != '&' && query->data[end] != ';') end++;
        if (end > start) {
            const Py_UCS4 *pair = query->data + start;
            Py_ssize_t pair_len = end - start;
            Py_ssize_t eq = find_char(pair, 0, pair_len, '=');
            Py_ssize_t name_len = eq < 0 ? pair_len : eq;
            if (text_set(&w->value, eq < 0 ? pair : pair + eq + 1, eq < 0 ? 0 : pair_len - eq - 1) < 0) return -1;
            int rounds = percent_decode(&w->value, rounds_allowed, &w->spare, &w->scratch);
            if (rounds < 0) return -1;
            if (rounds > 1) {
                if (bytes_byte(key, MARK_FLAG) < 0 || bytes_str(key, "value encoded more than once: ") < 0 ||
                    utf8_add(key, pair, name_len) < 0)
                    return -1;
            }
            if (eq < 0) {
                if (shape_of(pair, name_len, &w->shape) < 0) return -1;
                if (bytes_byte(key, MARK_FLAG) < 0 || bytes_str(key, "parameter without '=': ") < 0 ||
                    utf8_add(key, w->shape.data, w->shape.len < MAX_SHAPE ? w->shape.len : MAX_SHAPE) < 0)
                    return -1;
            }
            if (text_set(&w->name, pair, name_len) < 0) return -1;
            if (percent_decode(&w->name, 1, &w->spare, &w->scratch) < 0) return -1;
            if (w->name.len > 64) w->name.len = 64;
            if (shape_of(w->value.data, w->value.len, &w->shape) < 0) return -1;
            if (w->shape.len > MAX_SHAPE) w->shape.len = MAX_SHAPE;
            int is_enumerated = 0;
            if (maybe_enumerated) {
                Text *slot = &w->spare;
                if (text_set(slot, template_->data, template_->len) < 0 || text_push(slot, '?') < 0) return -1;
                for (Py_ssize_t k = 0; k < w->name.len; k++) if (text_push(slot, w->name.data[k]) < 0) return -1;
                PyObject *slot_str = text_to_str(slot->data, slot->len);
                if (!slot_str) return -1;
                is_enumerated = PySet_Contains(enumerated, slot_str);
                Py_DECREF(slot_str);
                if (is_enumerated < 0) return -1;
            }
            if (bytes_byte(params, MARK_PARAM) < 0 || utf8_add(params, w->name.data, w->name.len) < 0 ||
                bytes_byte(params, MARK_FIELD) < 0 || utf8_add(params, w->shape.data, w->shape.len) < 0 ||
                bytes_byte(params, MARK_FIELD) < 0)
                return -1;
            if (is_enumerated) {
                if (utf8_add(params, w->value.data, w->value.len < 64 ? w->value.len : 64) < 0) return -1;
            } else if (bytes_byte(params, MARK_NO_ENUM) < 0) {
                return -1;
            }
            if (bytes_byte(params, MARK_FIELD) < 0 || add_decimal(params, bit_length(w->value.len)) < 0) return -1;
        }
        start = end + 1;
    }
    if (bytes_byte(key, MARK_TEMPLATE) < 0 || utf8_add(key, template_->data, template_->len) < 0 ||
        bytes_add(key, params->data, params->len) < 0)
        return -1;
    return 0;
}

#define TEMPLATE_SET_CAPSULE "logscore.features._native.TemplateSet"

static void template_set_capsule_free(PyObject *capsule) {
    TemplateSet *t = PyCapsule_GetPointer(capsule, TEMPLATE_SET_CAPSULE);
    template_set_free(t);
    PyMem_Free(t);
}

/* template_set(templates): the enumerated templates' table, made once a model (a converter keeps it)
 * rather than on every url_structures call, which is every record when records come one at a time. */
static PyObject *template_set(PyObject *module, PyObject *templates) {
    if (!PyFrozenSet_Check(templates)) {
        PyErr_Format(PyExc_TypeError, "enumerated templates must be a frozenset; got %.100s", Py_TYPE(templates)->tp_name);
        return NULL;
    }
    TemplateSet *t = PyMem_Malloc(sizeof *t);
    if (!t) return PyErr_NoMemory();
    if (template_set_make(t, templates) < 0) { PyMem_Free(t); return NULL; }
    PyObject *capsule = PyCapsule_New(t, TEMPLATE_SET_CAPSULE, template_set_capsule_free);
    if (!capsule) { template_set_free(t); PyMem_Free(t); }
    return capsule;
}

/* url_structures(values, full, decode_rounds, enumerated, enumerated_templates): one bytes key per
 * value (None stays); enumerated_templates: template_set(the templates enumerated's slots start with). */
static PyObject *url_structures(PyObject *module, PyObject *args) {
    PyObject *values, *enumerated, *templates_capsule;
    int full, rounds;
    if (!PyArg_ParseTuple(args, "O!piO!O", &PyList_Type, &values, &full, &rounds, &PyFrozenSet_Type, &enumerated,
                          &templates_capsule))
        return NULL;
    /* the capsule lives as long as this call's arguments: Python code run meanwhile cannot free it */
    const TemplateSet *templates = PyCapsule_GetPointer(templates_capsule, TEMPLATE_SET_CAPSULE);
    if (!templates) {
        PyErr_SetString(PyExc_TypeError, "enumerated_templates must be made by template_set(frozenset)");
        return NULL;
    }
    values = own_items(values);  /* the sets' __eq__ and allocations may run Python code */
    if (!values) return NULL;
    if (check_values(values) < 0) { Py_DECREF(values); return NULL; }
    Py_ssize_t n = PyTuple_GET_SIZE(values);
    PyObject *out = hidden_list(n);
    if (!out) { Py_DECREF(values); return NULL; }
    UrlWork work;
    url_work_take(&work);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *value = PyTuple_GET_ITEM(values, i), *item;
        if (value == Py_None) {
            item = Py_NewRef(Py_None);
        } else {
            if (url_structure(value, full, rounds, enumerated, templates, &work) < 0) goto fail;
            item = PyBytes_FromStringAndSize(work.key.data, work.key.len);
            if (!item) goto fail;
        }
        PyList_SET_ITEM(out, i, item);
    }
    url_work_free(&work);
    Py_DECREF(values);
    return shown(out);
fail:
    url_work_free(&work);
    Py_DECREF(values);
    Py_DECREF(out);
    return NULL;
}

typedef struct {
    const char *data;
    Py_ssize_t len;
} Span;

static Py_ssize_t utf8_chars(Span s) {
    Py_ssize_t count = 0;
    for (Py_ssize_t i = 0; i < s.len; i++) count += ((unsigned char)s.data[i] & 0xC0) != 0x80;
    return count;
}

static Py_ssize_t utf8_char_len(unsigned char lead) {
    return lead < 0x80 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4;
}

static int span_compare(const void *a, const void *b) {
    const Span *x = a, *y = b;
    Py_ssize_t n = x->len < y->len ? x->len : y->len;
    int c = memcmp(x->data, y->data, n);
    return c ? c : (x->len > y->len) - (x->len < y->len);
}

/* Append the texts' parts to the counter's arena, then count the text (`repeat`: see counter_add). */
static int emit_counted(Counter *c, const char *prefix, Span a, const char *middle, Span b, float repeat) {
    Py_ssize_t start = c->arena.len;
    if (bytes_str(&c->arena, prefix) < 0 || bytes_add(&c->arena, a.data, a.len) < 0) return -1;
    if (middle && (bytes_str(&c->arena, middle) < 0 || bytes_add(&c->arena, b.data, b.len) < 0)) return -1;
    return counter_add(c, start, repeat);
}

static int emit(Counter *c, const char *prefix, Span a, const char *middle, Span b) {
    return emit_counted(c, prefix, a, middle, b, 1.0f);
}

static Span next_field(const char **p, const char *end) {
    const char *start = *p;
    while (*p < end && (unsigned char)**p < MARK_FLAG) (*p)++;
    return (Span){start, *p - start};
}

/* UrlConverter._structure_features of one structure key, counted into c. */
static int url_key_features(const char *data, Py_ssize_t len, int full, Counter *c, Bytes *slot, Span **names,
                            Py_ssize_t *names_cap) {
    const char *p = data, *end = data + len;
    while (p < end && (unsigned char)*p == MARK_FLAG) {
        p++;
        if (emit(c, "", next_field(&p, end), NULL, (Span){0}) < 0) return -1;
    }
    if (p >= end || (unsigned char)*p != MARK_TEMPLATE) { PyErr_SetString(PyExc_ValueError, "not a URL structure"); return -1; }
    p++;
    Span template_ = next_field(&p, end);
    Py_ssize_t count = 0;
    while (p < end && (unsigned char)*p == MARK_PARAM) {
        p++;
        Span name = next_field(&p, end);
        if (p < end) p++;
        Span shape = next_field(&p, end);
        if (p < end) p++;
        int has_enum = !(p < end && (unsigned char)*p == MARK_NO_ENUM);
        Span enum_value = {p, 0};
        if (has_enum) enum_value = next_field(&p, end);
        else p++;
        if (p < end) p++;
        Span length = next_field(&p, end);
        slot->len = 0;
        if (bytes_add(slot, template_.data, template_.len) < 0 || bytes_byte(slot, '?') < 0 ||
            bytes_add(slot, name.data, name.len) < 0)
            return -1;
        Span slot_span = {slot->data, slot->len};
        if (utf8_chars(shape) <= MAX_EXACT_SHAPE) {
            if (emit(c, "shape ", name, "=", shape) < 0 || emit(c, "shape ", slot_span, "=", shape) < 0) return -1;
        }
        for (Py_ssize_t i = 0; i < shape.len;) {  /* dict.fromkeys(shape) */
            Py_ssize_t width = utf8_char_len((unsigned char)shape.data[i]);
            if (width > shape.len - i) width = shape.len - i;  /* a key not made by url_structures */
            int seen = 0;
            for (Py_ssize_t j = 0; j < i && !seen;) {
                Py_ssize_t other = utf8_char_len((unsigned char)shape.data[j]);
                if (other > i - j) other = i - j;
                seen = other == width && memcmp(shape.data + i, shape.data + j, width) == 0;
                j += other;
            }
            if (!seen && emit(c, "character ", name, "=", (Span){shape.data + i, width}) < 0) return -1;
            i += width;
        }
        if (has_enum && emit(c, "value ", slot_span, "=", enum_value) < 0) return -1;
        if (emit(c, "length ", slot_span, "=", length) < 0 || emit(c, "parameter ", slot_span, NULL, (Span){0}) < 0)
            return -1;
        if (count >= *names_cap) {
            Py_ssize_t cap = *names_cap ? *names_cap * 2 : 16;
            Span *grown = PyMem_Realloc(*names, cap * sizeof(Span));
            if (!grown) { PyErr_NoMemory(); return -1; }
            *names = grown;
            *names_cap = cap;
        }
        (*names)[count++] = name;
    }
    if (full) {
        if (emit(c, "path ", template_, NULL, (Span){0}) < 0) return -1;
        /* dict.fromkeys(template.split("/")): only this loop emits "segment " texts, so the counter's
         * own table (crc, then the bytes) finds a repeated segment; it is dropped, not counted twice.
         * (Rescanning the earlier segments instead was quadratic: 11 ms a URL of 2,700 segments.) */
        for (Py_ssize_t start = 0;;) {
            Py_ssize_t stop = start;
            while (stop < template_.len && template_.data[stop] != '/') stop++;
            Span segment = {template_.data + start, stop - start};
            if (emit_counted(c, "segment ", segment, NULL, (Span){0}, 0.0f) < 0) return -1;
            if (stop >= template_.len) break;
            start = stop + 1;
        }
    }
    /* "parameters {template}?" + "&".join(sorted(set(names))) */
    if (count > 1) qsort(*names, count, sizeof(Span), span_compare);  /* *names is NULL when count == 0 */
    Py_ssize_t start = c->arena.len;
    if (bytes_str(&c->arena, "parameters ") < 0 || bytes_add(&c->arena, template_.data, template_.len) < 0 ||
        bytes_byte(&c->arena, '?') < 0)
        return -1;
    for (Py_ssize_t i = 0, written = 0; i < count; i++) {
        if (i > 0 && span_compare(&(*names)[i], &(*names)[i - 1]) == 0) continue;
        if (written++ && bytes_byte(&c->arena, '&') < 0) return -1;
        if (bytes_add(&c->arena, (*names)[i].data, (*names)[i].len) < 0) return -1;
    }
    return counter_commit(c, start);
}

/* url_features(values, structures, full, seed, weight, weigher, converter): the features of
 * each structure key, hashed, named by the value given with it. */
static PyObject *url_features(PyObject *module, PyObject *args) {
    PyObject *values, *structures, *weigher, *converter;
    int full, weighting;
    unsigned int seed;
    double weight;
    if (!PyArg_ParseTuple(args, "O!O!pIdOO", &PyList_Type, &values, &PyList_Type, &structures, &full, &seed, &weight,
                          &weigher, &converter))
        return NULL;
    if (check_producer(weigher, converter, &weighting) < 0) return NULL;
    Counted counted;
    Counter counter;
    Bytes slot = {0};
    Span *names = NULL;
    Py_ssize_t names_cap = 0;
    PyObject *result = NULL;
    values = own_items(values);  /* the weigher runs Python code */
    if (counting_take(&counted, &counter, seed) < 0 || !values) goto done;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(structures); i++) {
        PyObject *structure = PyList_GET_ITEM(structures, i);
        counter_reset(&counter);
        if (structure == Py_None) {
            Py_ssize_t start = counter.arena.len;
            if (bytes_str(&counter.arena, "(missing)") < 0 || counter_commit(&counter, start) < 0) goto done;
        } else if (!PyBytes_CheckExact(structure)) {
            PyErr_SetString(PyExc_TypeError, "structures must be bytes or None");
            goto done;
        } else if (url_key_features(PyBytes_AS_STRING(structure), PyBytes_GET_SIZE(structure), full, &counter, &slot,
                                    &names, &names_cap) < 0) {
            goto done;
        }
        if (counter_emit(&counter, &counted) < 0) goto done;
    }
    result = counted_to_features(&counted, values, converter, weighting, weight, weigher);
done:
    counted_free(&counted);
    counter_free(&counter);
    bytes_free(&slot);
    PyMem_Free(names);
    Py_XDECREF(values);
    return result;
}

/* ------------------------------------------------------------------ numeric */

static PyObject *magnitude_labels[1100];  /* "magnitude {e}", made once each */

/* numeric_labels(values, missing): NumericConverter.transform's labels and column:
 * (label ids int64 bytearray, distinct labels, log1p float64 bytearray). */
static PyObject *numeric_labels(PyObject *module, PyObject *args) {
    PyObject *values, *missing;
    if (!PyArg_ParseTuple(args, "O!U", &PyList_Type, &values, &missing)) return NULL;
    if (!PyUnicode_CheckExact(missing)) {
        PyErr_SetString(PyExc_TypeError, "the missing label must be str (not a subclass)");
        return NULL;
    }
    values = own_items(values);
    if (!values) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(values);
    PyObject *ids = new_bytearray(n * 8), *column = new_bytearray(n * 8);
    PyObject *index = PyDict_New(), *labels = PyList_New(0);
    if (!ids || !column || !index || !labels || check_values(values) < 0) goto fail;
    int64_t *id = (int64_t *)PyByteArray_AS_STRING(ids);
    double *out = (double *)PyByteArray_AS_STRING(column);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *value = PyTuple_GET_ITEM(values, i), *label;
        double number = 0.0;
        if (value == Py_None) {
            label = Py_NewRef(missing);
        } else {
            int finite = 0;
            PyObject *parsed = NULL;
            Py_ssize_t digits = PyUnicode_IS_ASCII(value) ? PyUnicode_GET_LENGTH(value) : 0;
            const char *text = PyUnicode_IS_ASCII(value) ? (const char *)PyUnicode_DATA(value) : "";
            int simple = digits > 0 && digits <= 15;  /* an integer float() reads exactly */
            for (Py_ssize_t k = 0; k < digits && simple; k++) simple = text[k] >= '0' && text[k] <= '9';
            if (simple) {
                long long integer = 0;
                for (Py_ssize_t k = 0; k < digits; k++) integer = integer * 10 + (text[k] - '0');
                number = (double)integer;
                finite = 1;
            } else if (!(parsed = PyFloat_FromString(value))) {  /* float(value), as parse_number */
                if (!PyErr_ExceptionMatches(PyExc_ValueError)) goto fail;
                PyErr_Clear();
            } else {
                number = PyFloat_AS_DOUBLE(parsed);
                Py_DECREF(parsed);
                finite = isfinite(number);
            }
            if (!finite) {
                number = 0.0;
                label = PyUnicode_FromString("not a number");
            } else {
                if (0.0 > number) number = 0.0;  /* max(number, 0.0) keeps -0.0 */
                int exponent = 0;
                if (number >= 1.0) frexp(number, &exponent);
                if (!magnitude_labels[exponent]) magnitude_labels[exponent] = PyUnicode_FromFormat("magnitude %d", exponent);
                label = Py_XNewRef(magnitude_labels[exponent]);
                number = number == 0.0 ? number : log1p(number);
            }
        }
        if (!label) goto fail;
        PyObject *known = PyDict_GetItemWithError(index, label);
        if (known) {
            id[i] = PyLong_AsLongLong(known);
        } else {
            if (PyErr_Occurred()) { Py_DECREF(label); goto fail; }
            id[i] = PyList_GET_SIZE(labels);
            PyObject *next = PyLong_FromSsize_t(id[i]);
            int ok = next && PyDict_SetItem(index, label, next) == 0 && PyList_Append(labels, label) == 0;
            Py_XDECREF(next);
            if (!ok) { Py_DECREF(label); goto fail; }
        }
        out[i] = number;
        Py_DECREF(label);
    }
    Py_DECREF(index);
    Py_DECREF(values);
    return Py_BuildValue("NNN", ids, labels, column);
fail:
    Py_DECREF(values);
    Py_XDECREF(ids);
    Py_XDECREF(column);
    Py_XDECREF(index);
    Py_XDECREF(labels);
    return NULL;
}

/* ------------------------------------------------------------------ columns, distinct */

/* distinct(column): (ids int64 bytearray, distinct values in first-seen order).
 * NOTE: the values are found in a table of our own (hash, id), sized once for the column, not a
 * dict of ints: the dict's inserts, its growth and an int object per value were two thirds of
 * this step on novel traffic (where nearly every URL is new). A str's hash is kept in the str,
 * so the caches' lookups by value that follow do not compute it again. */
static PyObject *distinct(PyObject *module, PyObject *column) {
    if (!PyList_Check(column)) { PyErr_SetString(PyExc_TypeError, "column must be a list"); return NULL; }
    column = own_items(column);  /* allocations may run Python code that changes the caller's */
    if (!column) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(column), size = 16;
    while (size < 2 * n) size *= 2;
    struct { Py_hash_t hash; Py_ssize_t id; } *table = PyMem_Malloc(size * sizeof *table);
    PyObject *ids = new_bytearray(n * 8), *values = PyList_New(0);
    if (!table || !ids || !values) { if (!table) PyErr_NoMemory(); goto fail; }
    for (Py_ssize_t slot = 0; slot < size; slot++) table[slot].id = -1;
    int64_t *id = (int64_t *)PyByteArray_AS_STRING(ids);
    PyObject *previous = NULL;
    int64_t previous_id = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *value = PyTuple_GET_ITEM(column, i);
        if (value == previous) { id[i] = previous_id; continue; }  /* the same object again */
        if (value != Py_None && !PyUnicode_CheckExact(value)) {  /* no __hash__ or __eq__ of a caller runs */
            PyErr_Format(PyExc_TypeError, "column values must be str or None (not a subclass); got %.100s",
                         Py_TYPE(value)->tp_name);
            goto fail;
        }
        Py_hash_t hash = PyObject_Hash(value);
        if (hash == -1) goto fail;
        Probe p = probe_start((size_t)hash, (size_t)size - 1);
        while (table[p.at].id >= 0 &&
               !(table[p.at].hash == hash && same_key(PyList_GET_ITEM(values, table[p.at].id), value)))
            probe_next(&p);
        if (table[p.at].id < 0) {
            table[p.at].hash = hash;
            table[p.at].id = PyList_GET_SIZE(values);
            if (PyList_Append(values, value) < 0) goto fail;
        }
        id[i] = previous_id = table[p.at].id;
        previous = value;
    }
    PyMem_Free(table);
    Py_DECREF(column);
    return Py_BuildValue("NN", ids, values);
fail:
    PyMem_Free(table);
    Py_DECREF(column);
    Py_XDECREF(ids);
    Py_XDECREF(values);
    return NULL;
}

/* parsers._ACCESS_FAST on an ASCII line, by hand:
 *   (?:(\S+:\d+) )?(\S+) \S+ (\S+) \[([^\]]*)\] "([A-Z]+) ([^ "\\]+) (HTTP/[\d.]+)" (\d{3}) (\d+|-)
 *   (?: "(QUOTED)" "(QUOTED)")?        QUOTED = [^"\\]*(?:\\.[^"\\]*)*
 * Past the optional vhost (tried first, as the regex does, then without), every part is
 * deterministic (no backtracking can change the match), so scanning left to right gives the
 * regex's groups. */
enum { G_ADDR, G_USER, G_TIME, G_METHOD, G_URL, G_PROTOCOL, G_STATUS, G_BYTES, G_REFERER, G_AGENT, G_VHOST, GROUPS };

/* Py_UNICODE_ISSPACE of each byte, made at import: a local table read per character, where the
 * macro's table is reached through libpython's symbol table (about twice the instructions). */
static unsigned char byte_is_space[256];

static void space_init(void) {
    for (int c = 0; c < 256; c++) byte_is_space[c] = Py_UNICODE_ISSPACE(c) != 0;
}

static Py_ssize_t scan_nonspace(const unsigned char *s, Py_ssize_t i, Py_ssize_t n) {
    Py_ssize_t start = i;
    while (i < n && !byte_is_space[s[i]]) i++;
    return i > start ? i : -1;
}

/* Where byte c first is in s[i:n], or n. */
static Py_ssize_t find_byte(const unsigned char *s, Py_ssize_t i, Py_ssize_t n, int c) {
    const unsigned char *found = memchr(s + i, c, n - i);
    return found ? found - s : n;
}

/* Where any of the bytes a, b, c first is in s[i:n], or n (memchr: a URL is a third of a line). */
static Py_ssize_t find_any(const unsigned char *s, Py_ssize_t i, Py_ssize_t n, int a, int b, int c) {
    Py_ssize_t end = find_byte(s, i, n, a);
    end = find_byte(s, i, end, b);
    return find_byte(s, i, end, c);
}

/* The end of QUOTED from i: the first '"' not escaped by a backslash (-1: none, or a backslash
 * before a newline or the end). NOTE: memchr, not a loop over bytes: a user agent is ~100 of a
 * line's ~200 bytes, and most hold no backslash. The quote found is kept until passed, so a run
 * of escapes is not searched again for it. */
static Py_ssize_t scan_quoted(const unsigned char *s, Py_ssize_t i, Py_ssize_t n) {
    Py_ssize_t quote = -1;
    while (i < n) {
        if (quote < i) quote = find_byte(s, i, n, '"');
        Py_ssize_t b = find_byte(s, i, quote, '\\');
        if (b == quote) return quote < n ? quote : -1;
        if (b + 1 >= n || s[b + 1] == '\n') return -1;
        i = b + 2;
    }
    return -1;
}

static int match_access_from(const unsigned char *s, Py_ssize_t i, Py_ssize_t n, Py_ssize_t span[GROUPS][2]) {
    Py_ssize_t e;
#define EXPECT(c) do { if (i >= n || s[i] != (c)) return 0; i++; } while (0)
#define GROUP(g, a, b) do { span[g][0] = (a); span[g][1] = (b); } while (0)
    if ((e = scan_nonspace(s, i, n)) < 0) return 0;
    GROUP(G_ADDR, i, e); i = e; EXPECT(' ');
    if ((e = scan_nonspace(s, i, n)) < 0) return 0;
    i = e; EXPECT(' ');
    if ((e = scan_nonspace(s, i, n)) < 0) return 0;
    GROUP(G_USER, i, e); i = e; EXPECT(' ');
    EXPECT('[');
    e = find_byte(s, i, n, ']');
    GROUP(G_TIME, i, e); i = e; EXPECT(']'); EXPECT(' '); EXPECT('"');
    e = i; while (e < n && s[e] >= 'A' && s[e] <= 'Z') e++;
    if (e == i) return 0;
    GROUP(G_METHOD, i, e); i = e; EXPECT(' ');
    e = find_any(s, i, n, ' ', '"', '\\');
    if (e == i) return 0;
    GROUP(G_URL, i, e); i = e; EXPECT(' ');
    Py_ssize_t protocol = i;
    EXPECT('H'); EXPECT('T'); EXPECT('T'); EXPECT('P'); EXPECT('/');
    e = i; while (e < n && ((s[e] >= '0' && s[e] <= '9') || s[e] == '.')) e++;
    if (e == i) return 0;
    GROUP(G_PROTOCOL, protocol, e); i = e; EXPECT('"'); EXPECT(' ');
    for (int k = 0; k < 3; k++) if (i + k >= n || s[i + k] < '0' || s[i + k] > '9') return 0;
    GROUP(G_STATUS, i, i + 3); i += 3; EXPECT(' ');
    if (i < n && s[i] >= '0' && s[i] <= '9') {
        e = i; while (e < n && s[e] >= '0' && s[e] <= '9') e++;
    } else if (i < n && s[i] == '-') {
        e = i + 1;
    } else {
        return 0;
    }
    GROUP(G_BYTES, i, e); i = e;
    span[G_REFERER][0] = span[G_AGENT][0] = -1;
    /* the optional (?: "referer" "agent") */
    if (i + 2 <= n && s[i] == ' ' && s[i + 1] == '"') {
        Py_ssize_t a = i + 2, b = scan_quoted(s, a, n);
        if (b >= 0 && b + 3 <= n && s[b + 1] == ' ' && s[b + 2] == '"') {
            Py_ssize_t c = b + 3, d = scan_quoted(s, c, n);
            if (d >= 0) { GROUP(G_REFERER, a, b); GROUP(G_AGENT, c, d); }
        }
    }
#undef EXPECT
#undef GROUP
    return 1;
}

/* \S+:\d+ over the whole token s[0:end]: digits to its end, a colon before them, something before that */
static int ends_in_port(const unsigned char *s, Py_ssize_t end) {
    Py_ssize_t j = end;
    while (j > 0 && s[j - 1] >= '0' && s[j - 1] <= '9') j--;
    return j < end && j >= 2 && s[j - 1] == ':';
}

/* Apache's vhost_combined puts "%v:%p " before the client: a first token ending in ":digits" is
 * the vhost where the rest matches after it (an IPv6 client ends so too: then the rest does not). */
static int match_access(const unsigned char *s, Py_ssize_t n, Py_ssize_t span[GROUPS][2]) {
    Py_ssize_t e = scan_nonspace(s, 0, n);
    if (e > 0 && e < n && s[e] == ' ' && ends_in_port(s, e) && match_access_from(s, e + 1, n, span)) {
        span[G_VHOST][0] = 0;
        span[G_VHOST][1] = e;
        return 1;
    }
    span[G_VHOST][0] = -1;
    return match_access_from(s, 0, n, span);
}

enum { F_NONE, F_ADDR, F_USER, F_TIME, F_REQUEST, F_METHOD, F_URL, F_PROTOCOL, F_STATUS, F_BYTES, F_REFERER, F_AGENT,
       F_VHOST };

static int access_field_code(PyObject *name) {
    static const char *names[] = {"remote_addr", "user", "time", "request", "method", "url", "protocol",
                                  "status", "bytes", "referer", "user_agent", "vhost"};
    for (int k = 0; k < 12; k++)
        if (PyUnicode_CompareWithASCIIString(name, names[k]) == 0) return k + 1;
    return F_NONE;
}

/* Strs made of a column's recent values, by a hash of their length and a few of their bytes: a
 * field whose values repeat (a method, a status, a client's user agent) gets the str made before,
 * neither made nor hashed again (a str keeps its hash; distinct values are then found by
 * identity). A slot holds the last value that fell in it.
 * NOTE: a hash of the length and the first and last 8 bytes (times 2^64/phi, top bits) with two
 * values a slot made fewer strs (two alternating look-alike user agents: 1,000 -> 2 a 1,000 lines;
 * the blog's URLs 331 -> 184) yet cost more than it saved (callgrind, featurizing: 5,196 -> 5,215
 * instructions a record on repetitive traffic, 18,996 -> 19,044 on novel); so did each half. */
#define RECENT_SLOTS 16

static PyObject *recent_substring(PyObject *line, Py_ssize_t a, Py_ssize_t b, PyObject **recent) {
    const unsigned char *s = PyUnicode_1BYTE_DATA(line);  /* the fast path reads ASCII lines only */
    Py_ssize_t n = b - a;
    if (n <= 0) return PyUnicode_Substring(line, a, b);
    size_t slot = ((size_t)n ^ ((size_t)s[a] << 1) ^ ((size_t)s[a + n / 2] << 2) ^ ((size_t)s[b - 1] << 3)) &
                  (RECENT_SLOTS - 1);
    PyObject *made = recent[slot];
    if (made && PyUnicode_GET_LENGTH(made) == n && memcmp(PyUnicode_1BYTE_DATA(made), s + a, n) == 0)
        return Py_NewRef(made);
    made = PyUnicode_Substring(line, a, b);
    if (made) Py_XSETREF(recent[slot], Py_NewRef(made));
    return made;
}

static void recent_free(PyObject **recent, Py_ssize_t slots) {
    if (!recent) return;
    for (Py_ssize_t i = 0; i < slots; i++) Py_XDECREF(recent[i]);
    PyMem_Free(recent);
}

/* A field of a fast-matched line, as parse_access builds it ("-" -> "" for user, bytes, referer);
 * recent: the column's RECENT_SLOTS. */
static PyObject *access_field(PyObject *line, const unsigned char *s, Py_ssize_t span[GROUPS][2], int code,
                              PyObject **recent) {
    int group;
    switch (code) {
    case F_ADDR: group = G_ADDR; break;
    case F_USER: group = G_USER; break;
    case F_TIME: group = G_TIME; break;
    case F_METHOD: group = G_METHOD; break;
    case F_URL: group = G_URL; break;
    case F_PROTOCOL: group = G_PROTOCOL; break;
    case F_STATUS: group = G_STATUS; break;
    case F_BYTES: group = G_BYTES; break;
    case F_REFERER: group = G_REFERER; break;
    case F_AGENT: group = G_AGENT; break;
    case F_VHOST: group = G_VHOST; break;
    case F_REQUEST: {  /* f"{method} {url} {protocol}": three adjacent groups, one space apart */
        Py_ssize_t a = span[G_METHOD][0], b = span[G_PROTOCOL][1];
        return recent_substring(line, a, b, recent);
    }
    default: Py_RETURN_NONE;
    }
    Py_ssize_t a = span[group][0], b = span[group][1];
    if (a < 0) Py_RETURN_NONE;
    if ((code == F_USER || code == F_BYTES || code == F_REFERER) && b - a == 1 && s[a] == '-')
        return PyUnicode_FromStringAndSize("", 0);
    return recent_substring(line, a, b, recent);
}

/* access_columns(records, wanted, fast, limit, max_line, normalize_one, to_text[, cut]):
 * Featurizer.normalized_values. A str line of at most max_line characters that matches the access
 * fast path (fast=True, ASCII) is read here; any other record (a longer line is cut by the one
 * truncation rule there) goes through normalize_one(record) -> (fields, parsed, cut).
 * Only the first `cut` columns (default: all) are cut to `limit` characters and mark a record
 * truncated; the others (windows' and clients' columns) are whole, and one naming a field of an
 * earlier column holds that column's value as it was before the cut.
 * Returns (columns: one list per wanted field, parsed: list of bool, truncated: list of bool). */
static PyObject *access_columns(PyObject *module, PyObject *args) {
    PyObject *records, *wanted, *normalize_one, *to_text;
    int fast;
    Py_ssize_t limit, max_line, cut_columns = -1;
    if (!PyArg_ParseTuple(args, "O!O!pnnOO|n", &PyList_Type, &records, &PyTuple_Type, &wanted, &fast, &limit,
                          &max_line, &normalize_one, &to_text, &cut_columns))
        return NULL;
    Py_ssize_t n, fields = PyTuple_GET_SIZE(wanted);
    if (cut_columns < 0 || cut_columns > fields) cut_columns = fields;
    int codes[64];
    Py_ssize_t same[64];  /* an uncut column's earlier column of the same field, or -1 */
    if (fields > 64) { PyErr_SetString(PyExc_ValueError, "at most 64 fields"); return NULL; }
    for (Py_ssize_t f = 0; f < fields; f++) {
        PyObject *name = PyTuple_GET_ITEM(wanted, f);
        if (!PyUnicode_Check(name)) { PyErr_SetString(PyExc_TypeError, "field names must be str"); return NULL; }
        codes[f] = access_field_code(name);
        same[f] = -1;
        for (Py_ssize_t e = 0; e < f && f >= cut_columns && same[f] < 0; e++)
            if (PyUnicode_Compare(name, PyTuple_GET_ITEM(wanted, e)) == 0) same[f] = e;
    }
    records = own_items(records);  /* normalize_one and to_text may change the caller's */
    if (!records) return NULL;
    n = PyTuple_GET_SIZE(records);
    PyObject *columns = hidden_list(fields), *parsed = hidden_list(n), *truncated = hidden_list(n);
    PyObject **recent = PyMem_Calloc(fields * RECENT_SLOTS, sizeof *recent);
    if (!recent) PyErr_NoMemory();
    if (!columns || !parsed || !truncated || !recent) goto fail;
    for (Py_ssize_t f = 0; f < fields; f++) {
        PyObject *column = PyList_New(n);
        if (!column) goto fail;
        for (Py_ssize_t r = 0; r < n; r++) PyList_SET_ITEM(column, r, Py_NewRef(Py_None));
        PyList_SET_ITEM(columns, f, column);
    }
    shown(columns);
    for (Py_ssize_t r = 0; r < n; r++) {
        PyObject *record = PyTuple_GET_ITEM(records, r);
        Py_ssize_t span[GROUPS][2];
        int ok = 1, cut = 0;
        if (fast && PyUnicode_CheckExact(record) && PyUnicode_IS_ASCII(record) &&
            PyUnicode_GET_LENGTH(record) <= max_line &&
            match_access(PyUnicode_DATA(record), PyUnicode_GET_LENGTH(record), span)) {
            for (Py_ssize_t f = 0; f < fields; f++) {
                if (same[f] >= 0) continue;
                PyObject *value = access_field(record, PyUnicode_DATA(record), span, codes[f], recent + f * RECENT_SLOTS);
                if (!value) goto fail;
                PyList_SetItem(PyList_GET_ITEM(columns, f), r, value);
            }
        } else {
            PyObject *result = PyObject_CallOneArg(normalize_one, record);
            if (!result) goto fail;
            PyObject *map, *flag, *line_cut;
            if (!PyArg_ParseTuple(result, "OOO", &map, &flag, &line_cut) || !PyDict_Check(map)) {
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_TypeError, "normalize_one must return (dict, bool, bool)");
                Py_DECREF(result);
                goto fail;
            }
            ok = PyObject_IsTrue(flag);
            cut = ok < 0 ? -1 : PyObject_IsTrue(line_cut);
            if (cut < 0) { Py_DECREF(result); goto fail; }
            for (Py_ssize_t f = 0; f < fields && ok >= 0; f++) {
                if (same[f] >= 0) continue;
                PyObject *value = PyDict_GetItemWithError(map, PyTuple_GET_ITEM(wanted, f));
                if (!value) {
                    if (PyErr_Occurred()) { Py_DECREF(result); goto fail; }
                    continue;
                }
                Py_INCREF(value);  /* to_text may change the map that holds it */
                if (value != Py_None && !PyUnicode_CheckExact(value)) Py_SETREF(value, PyObject_CallOneArg(to_text, value));
                if (!value) { Py_DECREF(result); goto fail; }
                if (value != Py_None && !PyUnicode_CheckExact(value)) {
                    PyErr_SetString(PyExc_TypeError, "to_text must return str (not a subclass)");
                    Py_DECREF(value);
                    Py_DECREF(result);
                    goto fail;
                }
                PyList_SetItem(PyList_GET_ITEM(columns, f), r, value);
            }
            Py_DECREF(result);
            if (ok < 0) goto fail;
        }
        for (Py_ssize_t f = cut_columns; f < fields; f++)
            if (same[f] >= 0)
                PyList_SetItem(PyList_GET_ITEM(columns, f), r, Py_NewRef(PyList_GET_ITEM(PyList_GET_ITEM(columns, same[f]), r)));
        for (Py_ssize_t f = 0; f < cut_columns; f++) {
            PyObject *value = PyList_GET_ITEM(PyList_GET_ITEM(columns, f), r);
            if (value != Py_None && PyUnicode_GET_LENGTH(value) > limit) {
                PyObject *shorter = PyUnicode_Substring(value, 0, limit);
                if (!shorter) goto fail;
                PyList_SetItem(PyList_GET_ITEM(columns, f), r, shorter);
                cut = 1;
            }
        }
        PyList_SET_ITEM(parsed, r, PyBool_FromLong(ok));
        PyList_SET_ITEM(truncated, r, PyBool_FromLong(cut));
    }
    recent_free(recent, fields * RECENT_SLOTS);
    Py_DECREF(records);
    return Py_BuildValue("NNN", columns, shown(parsed), shown(truncated));
fail:
    recent_free(recent, fields * RECENT_SLOTS);
    Py_DECREF(records);
    if (parsed) for (Py_ssize_t r = 0; r < n; r++) if (!PyList_GET_ITEM(parsed, r)) PyList_SET_ITEM(parsed, r, Py_NewRef(Py_None));
    if (truncated) for (Py_ssize_t r = 0; r < n; r++) if (!PyList_GET_ITEM(truncated, r)) PyList_SET_ITEM(truncated, r, Py_NewRef(Py_None));
    Py_XDECREF(columns);
    Py_XDECREF(parsed);
    Py_XDECREF(truncated);
    return NULL;
}

/* ------------------------------------------------------------------ window keys */

#define MAX_TEMPLATE_CHARS 160  /* windows.MAX_TEMPLATE_CHARS */
enum { NAME_BY_CALL, NAME_STATUS_CLASS, NAME_URL_TEMPLATE };

/* windows.url_template(url)[:MAX_TEMPLATE_CHARS]: the path (before "?"; after a scheme and host
 * when "://" starts within its first 12 characters: "/" + what follows the host), each segment
 * after a "/" that is an id as "{id}". NOTE: the reference is re.sub with (?=/|$), and $ also
 * matches before a newline that ends the path: a last segment "<id>\n" becomes "{id}\n". */
static inline Py_ALWAYS_INLINE Py_ssize_t url_template_of(int kind, const void *data, Py_ssize_t n, Py_UCS4 *out) {
    Py_ssize_t end = 0, size = 0, i = 0, p;
    while (end < n && PyUnicode_READ(kind, data, end) != '?') end++;
    int first_masked = 0;  /* the first segment follows a "/" (after a scheme) */
    Py_ssize_t scan = end < 12 ? end : 12;
    for (p = 0; p + 3 <= scan; p++)
        if (PyUnicode_READ(kind, data, p) == ':' && PyUnicode_READ(kind, data, p + 1) == '/' &&
            PyUnicode_READ(kind, data, p + 2) == '/') break;
    if (p + 3 <= scan) {
        i = p + 3;
        while (i < end && PyUnicode_READ(kind, data, i) != '/') i++;
        i = i < end ? i + 1 : end;
        out[size++] = '/';
        first_masked = 1;
    }
#define PUT(c) do { if (size >= MAX_TEMPLATE_CHARS) return size; out[size++] = (c); } while (0)
    for (int segment = 0;; segment++) {
        Py_ssize_t j = i;
        while (j < end && PyUnicode_READ(kind, data, j) != '/') j++;
        int masked = 0;
        if (segment > 0 || first_masked) {
            if (is_id_span(kind, data, i, j)) masked = 1;
            else if (j == end && j - i >= 2 && PyUnicode_READ(kind, data, j - 1) == '\n' &&
                     is_id_span(kind, data, i, j - 1)) masked = 2;
        }
        if (masked) {
            PUT('{'); PUT('i'); PUT('d'); PUT('}');
            if (masked == 2) PUT('\n');
        } else {
            for (Py_ssize_t k = i; k < j; k++) PUT(PyUnicode_READ(kind, data, k));
        }
        if (j >= end) break;
        PUT('/');
        i = j + 1;
    }
#undef PUT
    return size;
}

/* The key of one value ("" when it says nothing), as windows.KeyNamer._name gives it. */
static PyObject *window_key(PyObject *value, int code, PyObject *prefix, PyObject *name) {
    if (!PyUnicode_CheckExact(value) || code == NAME_BY_CALL) return PyObject_CallOneArg(name, value);
    Py_UCS4 text[MAX_TEMPLATE_CHARS + 8];
    Py_ssize_t size = 0;
    if (code == NAME_STATUS_CLASS) {
        int kind = PyUnicode_KIND(value);
        const void *data = PyUnicode_DATA(value);
        if (PyUnicode_GET_LENGTH(value) == 3) {
            Py_UCS4 c = PyUnicode_READ(kind, data, 0);
            if (c >= '1' && c <= '5' && Py_UNICODE_ISDIGIT(PyUnicode_READ(kind, data, 1)) &&
                Py_UNICODE_ISDIGIT(PyUnicode_READ(kind, data, 2))) {
                text[0] = c; text[1] = text[2] = 'x';
                size = 3;
            }
        }
    } else if (PyUnicode_KIND(value) == PyUnicode_1BYTE_KIND) {  /* the common case, specialized */
        size = url_template_of(PyUnicode_1BYTE_KIND, PyUnicode_DATA(value), PyUnicode_GET_LENGTH(value), text);
    } else {
        size = url_template_of(PyUnicode_KIND(value), PyUnicode_DATA(value), PyUnicode_GET_LENGTH(value), text);
    }
    if (size == 0) return PyUnicode_FromStringAndSize("", 0);
    Py_ssize_t start = PyUnicode_GET_LENGTH(prefix);
    Py_UCS4 widest = PyUnicode_MAX_CHAR_VALUE(prefix);
    for (Py_ssize_t i = 0; i < size; i++) if (text[i] > widest) widest = text[i];
    PyObject *key = PyUnicode_New(start + size, widest);
    if (!key) return NULL;
    int kind = PyUnicode_KIND(key);
    void *data = PyUnicode_DATA(key);
    if (kind == PyUnicode_1BYTE_KIND && PyUnicode_KIND(prefix) == PyUnicode_1BYTE_KIND) {
        memcpy(data, PyUnicode_DATA(prefix), start);
        for (Py_ssize_t i = 0; i < size; i++) ((Py_UCS1 *)data)[start + i] = (Py_UCS1)text[i];
        return key;
    }
    for (Py_ssize_t i = 0; i < start; i++) PyUnicode_WRITE(kind, data, i, PyUnicode_READ_CHAR(prefix, i));
    for (Py_ssize_t i = 0; i < size; i++) PyUnicode_WRITE(kind, data, start + i, text[i]);
    return key;
}

/* The bytes a cached text is counted as (sizes.text_bytes): its length, 4 a character unless
 * it is ASCII. NOTE: its widest storage, not PyUnicode_KIND: the Python reference cannot read a
 * str's kind cheaply, and both must keep the same values. */
static Py_ssize_t counted_bytes(PyObject *text) {
    Py_ssize_t length = PyUnicode_GET_LENGTH(text);
    if (PyUnicode_IS_ASCII(text)) return length;
    return length > PY_SSIZE_T_MAX / 4 ? PY_SSIZE_T_MAX : 4 * length;
}

/* key_counts(column, code, prefix, cache, max_cache, name[, max_chars[, max_bytes]]):
 * windows.KeyNamer.key_counts. Each distinct value of the column is named once: from cache
 * (value -> key, "" for none) else by name(value) (code 0), or here without a cache (code 1
 * status class, 2 URL template: working one out costs less than a lookup in a big cache when
 * every URL is new). A value named by call is kept with its key when it has at most max_chars
 * characters and the two texts count at most max_bytes bytes (counted_bytes; -1: no limit), the
 * cache cleared first when it holds max_cache: so it holds at most max_cache × max_bytes bytes
 * of text. Returns {key: records}, keys in the order their first value appears; None values are
 * skipped. */
typedef struct { Py_hash_t hash; PyObject *value; Py_ssize_t at; } ValueSlot;  /* value: borrowed */

static PyObject *key_counts(PyObject *module, PyObject *args) {
    PyObject *column, *prefix, *cache, *name;
    int code;
    Py_ssize_t max_cache, max_chars = -1, max_bytes = -1;  /* -1: a value of any length is kept */
    if (!PyArg_ParseTuple(args, "O!iUO!nO|nn", &PyList_Type, &column, &code, &prefix, &PyDict_Type, &cache,
                          &max_cache, &name, &max_chars, &max_bytes))
        return NULL;
    column = own_items(column);  /* name() may change the caller's */
    if (!column) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(column), found = 0, at = -1, size = 8;
    while (size < 2 * n) size <<= 1;
    /* This call's distinct values: an open-addressing table (the column holds the values). */
    ValueSlot *slots = PyMem_Calloc(size, sizeof(ValueSlot));
    Py_ssize_t *tally = PyMem_Malloc((n + 1) * sizeof(Py_ssize_t));
    PyObject *counts = PyDict_New(), *keys = PyList_New(0);
    if (!counts || !keys || !slots || !tally) { if (!PyErr_Occurred()) PyErr_NoMemory(); goto fail; }
    PyObject *previous = NULL;  /* the last value */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *value = PyTuple_GET_ITEM(column, i);
        if (value == Py_None) continue;
        if (value != previous) {
            Py_hash_t hash = PyObject_Hash(value);
            if (hash == -1) goto fail;
            ValueSlot *slot;
            for (Probe p = probe_start((size_t)hash, (size_t)size - 1);; probe_next(&p)) {
                slot = &slots[p.at];
                if (!slot->value) break;
                if (slot->hash == hash) {
                    int same = slot->value == value ? 1 : PyObject_RichCompareBool(slot->value, value, Py_EQ);
                    if (same < 0) goto fail;
                    if (same) break;
                }
            }
            if (slot->value) {
                at = slot->at;
            } else {
                PyObject *key;
                int is_text = PyUnicode_Check(value);
                Py_ssize_t value_bytes = is_text && max_bytes >= 0 ? counted_bytes(value) : 0;
                int kept = !is_text || ((max_chars < 0 || PyUnicode_GET_LENGTH(value) <= max_chars) &&
                                        (max_bytes < 0 || value_bytes <= max_bytes));
                if (code == NAME_BY_CALL && kept) {
                    key = PyDict_GetItemWithError(cache, value);
                    if (key) {
                        Py_INCREF(key);
                    } else {
                        if (PyErr_Occurred()) goto fail;
                        key = window_key(value, code, prefix, name);
                        /* (the entry's bytes: value_bytes <= max_bytes here, so no overflow) */
                        if (key && PyUnicode_Check(key) &&
                            (max_bytes < 0 || counted_bytes(key) <= max_bytes - value_bytes)) {
                            if (PyDict_GET_SIZE(cache) >= max_cache) PyDict_Clear(cache);
                            if (PyDict_SetItem(cache, value, key) < 0) Py_CLEAR(key);
                        }
                    }
                } else {
                    key = window_key(value, code, prefix, name);
                }
                if (!key) goto fail;
                if (!PyUnicode_Check(key)) {
                    Py_DECREF(key);
                    PyErr_SetString(PyExc_TypeError, "a window key must be str");
                    goto fail;
                }
                int failed = PyList_Append(keys, key) < 0;
                Py_DECREF(key);
                if (failed) goto fail;
                at = found++;
                slot->hash = hash;
                slot->value = value;
                slot->at = at;
                tally[at] = 0;
            }
            previous = value;
        }
        tally[at]++;
    }
    for (Py_ssize_t d = 0; d < found; d++) {
        PyObject *key = PyList_GET_ITEM(keys, d);
        if (PyUnicode_GET_LENGTH(key) == 0) continue;
        PyObject *held = PyDict_GetItemWithError(counts, key);
        if (!held && PyErr_Occurred()) goto fail;
        PyObject *count = PyLong_FromSsize_t(tally[d] + (held ? PyLong_AsSsize_t(held) : 0));
        if (!count || PyDict_SetItem(counts, key, count) < 0) { Py_XDECREF(count); goto fail; }
        Py_DECREF(count);
    }
    Py_DECREF(keys);
    Py_DECREF(column);
    PyMem_Free(slots);
    PyMem_Free(tally);
    return counts;
fail:
    Py_DECREF(column);
    Py_XDECREF(counts);
    Py_XDECREF(keys);
    PyMem_Free(slots);
    PyMem_Free(tally);
    return NULL;
}

/* ------------------------------------------------------------------ assembly */

/* out[0:n] = v, four a step with SSE2 (x86-64 always has it). */
static void fill_i64(int64_t *out, Py_ssize_t n, int64_t v) {
    Py_ssize_t i = 0;
#if defined(__SSE2__)
    const __m128i two = _mm_set1_epi64x(v);
    for (; i + 4 <= n; i += 4) {
        _mm_storeu_si128((__m128i *)(out + i), two);
        _mm_storeu_si128((__m128i *)(out + i + 2), two);
    }
#endif
    for (; i < n; i++) out[i] = v;
}

/* assemble(held, offsets, entries, size, with_origins): FeatureSink.build's expansion. held: one int64
 * buffer [size] per converter, indices into that converter's entries, which start at its offset (an int)
 * in entries (all Features). Record-major: record 0's keys of every converter in converter order, then
 * record 1's, ... Returns bytearrays (rows int64, keys int64, weights float32, entry_of_key int64,
 * position int64); the last two empty unless with_origins (only explanations need them). */
static PyObject *assemble(PyObject *module, PyObject *args) {
    PyObject *held, *offset_list, *entries;
    Py_ssize_t size;
    int with_origins;
    if (!PyArg_ParseTuple(args, "O!O!O!np", &PyList_Type, &held, &PyList_Type, &offset_list, &PyList_Type, &entries,
                          &size, &with_origins))
        return NULL;
    if (PyList_GET_SIZE(offset_list) != PyList_GET_SIZE(held)) {
        PyErr_SetString(PyExc_ValueError, "offsets: one per held buffer");
        return NULL;
    }
    /* Our own tuples, checked after the offsets are read (an offset's __index__ runs Python code) */
    offset_list = own_items(offset_list);
    if (!offset_list) return NULL;
    Py_ssize_t converters = PyTuple_GET_SIZE(offset_list);
    Py_buffer *views = PyMem_Calloc(converters ? converters : 1, sizeof(Py_buffer));
    int64_t *offsets = PyMem_Calloc(converters ? converters : 1, sizeof(int64_t));
    if (!views || !offsets) { PyMem_Free(views); PyMem_Free(offsets); Py_DECREF(offset_list); return PyErr_NoMemory(); }
    for (Py_ssize_t c = 0; c < converters; c++) {
        offsets[c] = PyLong_AsLongLong(PyTuple_GET_ITEM(offset_list, c));
        if (offsets[c] == -1 && PyErr_Occurred()) {
            PyMem_Free(views);
            PyMem_Free(offsets);
            Py_DECREF(offset_list);
            return NULL;
        }
    }
    Py_DECREF(offset_list);
    held = own_items(held);
    entries = held ? own_items(entries) : NULL;
    if (!entries) { Py_XDECREF(held); PyMem_Free(views); PyMem_Free(offsets); return NULL; }
    Py_ssize_t count = PyTuple_GET_SIZE(entries), acquired = 0, total = 0;
    PyObject *result = NULL, *rows = NULL, *keys = NULL, *weights = NULL, *origin = NULL, *position = NULL;
    if (PyTuple_GET_SIZE(held) != converters) {
        PyErr_SetString(PyExc_ValueError, "offsets: one per held buffer");
        goto done;
    }
    for (Py_ssize_t c = 0; c < converters; c++)
        if (offsets[c] < 0 || offsets[c] > count) {
            PyErr_SetString(PyExc_IndexError, "offsets: out of range");
            goto done;
        }
    for (Py_ssize_t e = 0; e < count; e++)
        if (Py_TYPE(PyTuple_GET_ITEM(entries, e)) != &FeaturesType) {
            PyErr_SetString(PyExc_TypeError, "assemble needs compiled Features entries");
            goto done;
        }
    for (; acquired < converters; acquired++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(held, acquired), &views[acquired], PyBUF_C_CONTIGUOUS) < 0) goto done;
        if (views[acquired].len != size * 8) { PyErr_SetString(PyExc_ValueError, "held: one int64 per record"); acquired++; goto done; }
    }
    for (Py_ssize_t c = 0; c < converters; c++) {
        const void *ids = views[c].buf;
        for (Py_ssize_t r = 0; r < size; r++) {
            int64_t id = load_i64(ids, r);
            if (id < 0 || id >= count - offsets[c]) {
                PyErr_SetString(PyExc_IndexError, "held: entry out of range");
                goto done;
            }
            total += Py_SIZE(PyTuple_GET_ITEM(entries, id + offsets[c]));
        }
    }
    rows = new_bytearray(total * 8); keys = new_bytearray(total * 8); weights = new_bytearray(total * 4);
    origin = new_bytearray(with_origins ? total * 8 : 0); position = new_bytearray(with_origins ? total * 8 : 0);
    if (!rows || !keys || !weights || !origin || !position) goto done;
    int64_t *row_out = (int64_t *)PyByteArray_AS_STRING(rows), *key_out = (int64_t *)PyByteArray_AS_STRING(keys);
    float *weight_out = (float *)PyByteArray_AS_STRING(weights);
    int64_t *origin_out = (int64_t *)PyByteArray_AS_STRING(origin), *position_out = (int64_t *)PyByteArray_AS_STRING(position);
    Py_ssize_t k = 0;
    for (Py_ssize_t r = 0; r < size; r++) {
        Py_ssize_t record_start = k;
        for (Py_ssize_t c = 0; c < converters; c++) {
            int64_t entry = load_i64(views[c].buf, r) + offsets[c];
            FeaturesObject *f = (FeaturesObject *)PyTuple_GET_ITEM(entries, entry);
            Py_ssize_t m = Py_SIZE(f);
            memcpy(key_out + k, FEATURES_KEYS(f), m * 8);
            memcpy(weight_out + k, FEATURES_WEIGHTS(f), m * 4);
            if (with_origins)
                for (Py_ssize_t j = 0; j < m; j++) {
                    origin_out[k + j] = entry;
                    position_out[k + j] = j;
                }
            k += m;
        }
        fill_i64(row_out + record_start, k - record_start, r);  /* a record's keys at once: ~130 on novel traffic */
    }
    result = Py_BuildValue("OOOOO", rows, keys, weights, origin, position);
done:
    for (Py_ssize_t c = 0; c < acquired; c++) if (views[c].obj) PyBuffer_Release(&views[c]);
    PyMem_Free(views);
    PyMem_Free(offsets);
    Py_DECREF(held);
    Py_DECREF(entries);
    Py_XDECREF(rows); Py_XDECREF(keys); Py_XDECREF(weights); Py_XDECREF(origin); Py_XDECREF(position);
    return result;
}

/* ------------------------------------------------------------------ line heads */

/* line_head(line, time_within, level_within) -> (time_start, time_end, level_start, level_end), -1 where
 * none: the spans parsers.line_head finds with its regular expressions (the reference; tests/test_native.py
 * holds the two equal), without a regex engine trying three patterns and fifteen words at every position. */
typedef struct { int kind; const void *data; Py_ssize_t n; } Head;

static Py_UCS4 text_at(const Head *t, Py_ssize_t i) { return i < t->n ? PyUnicode_READ(t->kind, t->data, i) : 0; }
static int ascii_digit(Py_UCS4 c) { return c >= '0' && c <= '9'; }
static int ascii_upper(Py_UCS4 c) { return c >= 'A' && c <= 'Z'; }
static int ascii_lower(Py_UCS4 c) { return c >= 'a' && c <= 'z'; }
static int ascii_letter(Py_UCS4 c) { return ascii_upper(c) || ascii_lower(c); }
static int word_joined(Py_UCS4 c) { return ascii_letter(c) || ascii_digit(c) || c == '_' || c == '.' || c == '-'; }

static int digits_at(const Head *t, Py_ssize_t i, int count) {
    for (int k = 0; k < count; k++) if (!ascii_digit(text_at(t, i + k))) return 0;
    return 1;
}

/* "dd:dd:dd" at i */
static int clock_at(const Head *t, Py_ssize_t i) {
    return digits_at(t, i, 2) && text_at(t, i + 2) == ':' && digits_at(t, i + 3, 2) && text_at(t, i + 5) == ':' &&
           digits_at(t, i + 6, 2);
}

/* "Mon" (an upper-case letter, two lower-case ones) at i */
static int capitalized_at(const Head *t, Py_ssize_t i) {
    return ascii_upper(text_at(t, i)) && ascii_lower(text_at(t, i + 1)) && ascii_lower(text_at(t, i + 2));
}

/* After i, up to `most` digits (at least one); the end, or -1. */
static Py_ssize_t some_digits(const Head *t, Py_ssize_t i, int most) {
    Py_ssize_t k = i;
    while (k - i < most && ascii_digit(text_at(t, k))) k++;
    return k > i ? k : -1;
}

/* " UTC" or " GMT" at i, not joined to a word ( UTC(?!\w)| GMT(?!\w) in ASCII: PostgreSQL's zone name) */
static int utc_named_at(const Head *t, Py_ssize_t i) {
    Py_UCS4 a = text_at(t, i + 1), b = text_at(t, i + 2), c = text_at(t, i + 3), after = text_at(t, i + 4);
    int named = (a == 'U' && b == 'T' && c == 'C') || (a == 'G' && b == 'M' && c == 'T');
    return text_at(t, i) == ' ' && named && !ascii_letter(after) && !ascii_digit(after) && after != '_';
}

/* \d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d{1,9})?(?:Z|[+-]\d{2}:?\d{2}(?![\d:]))? at i: its end, or -1 */
static Py_ssize_t iso_time_at(const Head *t, Py_ssize_t i) {
    if (!(digits_at(t, i, 4) && text_at(t, i + 4) == '-' && digits_at(t, i + 5, 2) && text_at(t, i + 7) == '-' &&
          digits_at(t, i + 8, 2) && (text_at(t, i + 10) == 'T' || text_at(t, i + 10) == ' ') && clock_at(t, i + 11)))
        return -1;
    Py_ssize_t end = i + 19;
    Py_UCS4 c = text_at(t, end);
    if ((c == '.' || c == ',') && ascii_digit(text_at(t, end + 1))) end = some_digits(t, end + 1, 9);
    c = text_at(t, end);
    if (c == 'Z') return end + 1;
    if ((c == '+' || c == '-') && digits_at(t, end + 1, 2)) {
        Py_UCS4 after;
        if (text_at(t, end + 3) == ':' && digits_at(t, end + 4, 2)) {
            after = text_at(t, end + 6);
            if (!ascii_digit(after) && after != ':') return end + 6;
        }
        if (digits_at(t, end + 3, 2)) {
            after = text_at(t, end + 5);
            if (!ascii_digit(after) && after != ':') return end + 5;
        }
    }
    return utc_named_at(t, end) ? end + 4 : end;
}

/* \d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2}(?:\.\d{1,9})? at i (nginx's error log, Go's log): its end, or -1 */
static Py_ssize_t slashed_time_at(const Head *t, Py_ssize_t i) {
    if (!(digits_at(t, i, 4) && text_at(t, i + 4) == '/' && digits_at(t, i + 5, 2) && text_at(t, i + 7) == '/' &&
          digits_at(t, i + 8, 2) && text_at(t, i + 10) == ' ' && clock_at(t, i + 11)))
        return -1;
    Py_ssize_t end = i + 19;
    return text_at(t, end) == '.' && ascii_digit(text_at(t, end + 1)) ? some_digits(t, end + 1, 9) : end;
}

/* [A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d{2}:\d{2}:\d{2}(?:\.\d{1,9})? \d{4} at i (C's ctime) */
static Py_ssize_t ctime_at(const Head *t, Py_ssize_t i) {
    Py_UCS4 day = text_at(t, i + 8);
    if (!(capitalized_at(t, i) && text_at(t, i + 3) == ' ' && capitalized_at(t, i + 4) && text_at(t, i + 7) == ' ' &&
          (day == ' ' || ascii_digit(day)) && ascii_digit(text_at(t, i + 9)) && text_at(t, i + 10) == ' ' &&
          clock_at(t, i + 11)))
        return -1;
    Py_ssize_t end = i + 19;
    if (text_at(t, end) == '.' && ascii_digit(text_at(t, end + 1))) end = some_digits(t, end + 1, 9);
    return text_at(t, end) == ' ' && digits_at(t, end + 1, 4) ? end + 5 : -1;
}

/* [A-Z][a-z]{2} {1,2}\d{1,2} \d{2}:\d{2}:\d{2} at i (syslog) */
static Py_ssize_t syslog_time_at(const Head *t, Py_ssize_t i) {
    if (!capitalized_at(t, i) || text_at(t, i + 3) != ' ') return -1;
    Py_ssize_t k = text_at(t, i + 4) == ' ' ? i + 5 : i + 4;
    if (!ascii_digit(text_at(t, k))) return -1;
    k += ascii_digit(text_at(t, k + 1)) ? 2 : 1;
    return text_at(t, k) == ' ' && clock_at(t, k + 1) ? k + 9 : -1;
}

/* ^\d{6} \d{6}(?!\d) (HDFS's yyMMdd HHmmss), only where the line starts */
static Py_ssize_t compact_time_at(const Head *t, Py_ssize_t i) {
    return i == 0 && digits_at(t, 0, 6) && text_at(t, 6) == ' ' && digits_at(t, 7, 6) && !ascii_digit(text_at(t, 13))
               ? 13 : -1;
}

/* ^\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d{1,9})? (Android logcat's MM-dd), only where the line starts */
static Py_ssize_t month_day_time_at(const Head *t, Py_ssize_t i) {
    if (!(i == 0 && digits_at(t, 0, 2) && text_at(t, 2) == '-' && digits_at(t, 3, 2) && text_at(t, 5) == ' ' &&
          clock_at(t, 6)))
        return -1;
    return text_at(t, 14) == '.' && ascii_digit(text_at(t, 15)) ? some_digits(t, 15, 9) : 14;
}

/* ^[IWEF]\d{4} \d{2}:\d{2}:\d{2}(?:\.\d{1,9})? (glog's level letter and MMdd), only where the line starts */
static Py_ssize_t glog_time_at(const Head *t, Py_ssize_t i) {
    Py_UCS4 letter = text_at(t, 0);
    if (!(i == 0 && (letter == 'I' || letter == 'W' || letter == 'E' || letter == 'F') && digits_at(t, 1, 4) &&
          text_at(t, 5) == ' ' && clock_at(t, 6)))
        return -1;
    return text_at(t, 14) == '.' && ascii_digit(text_at(t, 15)) ? some_digits(t, 15, 9) : 14;
}

static int level_word(const Head *t, Py_ssize_t i, Py_ssize_t end);

/* ^\d{2}/\d{2}/\d{2} \d{2}:\d{2}:\d{2}(?= LEVEL(?![\w.-])) (Spark's yy/MM/dd), only where the line starts and
 * a level word follows: a line starting with dd/MM/yy or MM/dd/yy is no time rather than a wrong one */
static Py_ssize_t short_slashed_time_at(const Head *t, Py_ssize_t i) {
    if (!(i == 0 && digits_at(t, 0, 2) && text_at(t, 2) == '/' && digits_at(t, 3, 2) && text_at(t, 5) == '/' &&
          digits_at(t, 6, 2) && text_at(t, 8) == ' ' && clock_at(t, 9) && text_at(t, 17) == ' '))
        return -1;
    Py_ssize_t end = 18;
    while (ascii_letter(text_at(t, end))) end++;
    Py_UCS4 after = text_at(t, end);
    int bounded = !ascii_letter(after) && !ascii_digit(after) && after != '_' && after != '.' && after != '-';
    return end > 18 && bounded && level_word(t, 18, end) ? 17 : -1;
}

/* ^\d{8}-\d{1,2}:\d{1,2}:\d{1,2}(?::\d{1,3})? (HealthApp's yyyyMMdd-H:m:s:S, each number after the date
 * unpadded), only where the line starts */
static Py_ssize_t dashed_compact_time_at(const Head *t, Py_ssize_t i) {
    if (!(i == 0 && digits_at(t, 0, 8) && text_at(t, 8) == '-')) return -1;
    Py_ssize_t end = 8;
    for (int part = 0; part < 3; part++) {  /* hours, minutes, seconds: each after its separator */
        if (part > 0 && text_at(t, end) != ':') return -1;
        end = some_digits(t, end + 1, 2);
        if (end < 0) return -1;
    }
    return text_at(t, end) == ':' && ascii_digit(text_at(t, end + 1)) ? some_digits(t, end + 1, 3) : end;
}

/* (?<=^\[)\d{2}\.\d{2} \d{2}:\d{2}:\d{2}(?=\]) (Proxifier's [MM.dd HH:mm:ss]), only where the line starts */
static Py_ssize_t bracketed_month_day_time_at(const Head *t, Py_ssize_t i) {
    return i == 1 && text_at(t, 0) == '[' && digits_at(t, 1, 2) && text_at(t, 3) == '.' && digits_at(t, 4, 2) &&
                   text_at(t, 6) == ' ' && clock_at(t, 7) && text_at(t, 15) == ']'
               ? 15 : -1;
}

static const char *LEVEL_WORDS[] = {"trace", "debug", "info", "notice", "warn", "warning", "error", "err", "fatal",
                                    "crit", "critical", "severe", "alert", "emerg", "panic", NULL};

/* Whether the letters [i, end) spell a level word, in any case. */
static int level_word(const Head *t, Py_ssize_t i, Py_ssize_t end) {
    for (const char **word = LEVEL_WORDS; *word; word++) {
        Py_ssize_t k = 0;
        while (i + k < end && (*word)[k] && (Py_UCS4)(*word)[k] == (text_at(t, i + k) | 0x20)) k++;
        if (i + k == end && !(*word)[k]) return 1;
    }
    return 0;
}

/* " +\d+ +\d+ +([VDIWEFA]) " at i (logcat's ids and level letter, before `end`): the letter's position, or -1 */
static Py_ssize_t logcat_level_at(const Head *t, Py_ssize_t i, Py_ssize_t end) {
    for (int field = 0; field < 2; field++) {
        Py_ssize_t k = i;
        while (text_at(t, k) == ' ') k++;
        if (k == i || !ascii_digit(text_at(t, k))) return -1;
        while (ascii_digit(text_at(t, k))) k++;
        i = k;
    }
    Py_ssize_t k = i;
    while (text_at(t, k) == ' ') k++;
    Py_UCS4 c = text_at(t, k);
    int letter = c == 'V' || c == 'D' || c == 'I' || c == 'W' || c == 'E' || c == 'F' || c == 'A';
    if (k == i || k + 2 > end || !letter || text_at(t, k + 1) != ' ') return -1;
    return k;
}

static PyObject *line_head(PyObject *module, PyObject *args) {
    PyObject *line;
    Py_ssize_t time_within, level_within;
    if (!PyArg_ParseTuple(args, "Unn", &line, &time_within, &level_within)) return NULL;
    Head t = {PyUnicode_KIND(line), PyUnicode_DATA(line), PyUnicode_GET_LENGTH(line)};
    Py_ssize_t time_start = -1, time_end = -1, level_start = -1, level_end = -1;
    for (Py_ssize_t i = 0; i < time_within && i < t.n && time_start < 0; i++) {
        Py_ssize_t end = iso_time_at(&t, i);
        if (end < 0) end = slashed_time_at(&t, i);
        if (end < 0) end = ctime_at(&t, i);
        if (end < 0) end = syslog_time_at(&t, i);
        if (end < 0) end = compact_time_at(&t, i);
        if (end < 0) end = month_day_time_at(&t, i);
        if (end < 0) end = glog_time_at(&t, i);
        if (end < 0) end = short_slashed_time_at(&t, i);
        if (end < 0) end = dashed_compact_time_at(&t, i);
        if (end < 0) end = bracketed_month_day_time_at(&t, i);
        if (end >= 0) time_start = i, time_end = end;
    }
    if (time_start == 0 && text_at(&t, 2) == '-') {  /* logcat's MM-dd: its level is a letter after the ids */
        Py_ssize_t letter = logcat_level_at(&t, time_end, time_end + level_within);
        if (letter >= 0) return Py_BuildValue("nnnn", time_start, time_end, letter, letter + 1);
    } else if (time_start == 0 && ascii_upper(text_at(&t, 0)) && ascii_digit(text_at(&t, 1))) {
        return Py_BuildValue("nnnn", time_start, time_end, (Py_ssize_t)0, (Py_ssize_t)1);  /* glog's level letter */
    }
    Py_ssize_t from = time_start >= 0 ? time_end : 0;
    for (Py_ssize_t i = from; i < from + level_within && i < t.n; i++) {
        if (!ascii_letter(text_at(&t, i)) || (i > 0 && word_joined(text_at(&t, i - 1)))) continue;
        Py_ssize_t end = i;
        while (ascii_letter(text_at(&t, end))) end++;
        if (!word_joined(text_at(&t, end)) && level_word(&t, i, end)) {
            level_start = i, level_end = end;
            break;
        }
        i = end;  /* the rest of this word is joined to its start */
    }
    return Py_BuildValue("nnnn", time_start, time_end, level_start, level_end);
}

/* ------------------------------------------------------------------ SurpriseTable */

/* A model's rarity table (its graph's LabelEncoder: key -> surprise, a default for every other key)
 * and what the graph makes of it next (Mul by key_weights, ScatterElements adding into zeros by
 * rows): each record's sum of surprise x weight, the same float32 products added in the same order,
 * so the same sums to the bit (twin of that part of the graph; graph_shortcut.py).
 * Keys are 32-bit. A bucket holds 8 of them in 32 bytes, filled from its start; a lookup compares
 * all 8 at once and takes the first match, with no branch on found or not (about half the keys of
 * novel traffic are in the shipped table: such a branch was mispredicted, 6.5 ns a key against 3.2,
 * the compiler's own made of `?:` too, hence the mask in surprise_of). An empty slot
 * holds key 0 and the default: a match there gives what a miss gives, and a real 0 sits before it.
 * Buckets hold 2 to 4 keys on average (16-32 bytes a key); the keys of a full bucket (about one
 * bucket in 50 at 4) go to a sorted spill list, searched only for a key missing from a bucket that
 * spilled. */
#define SURPRISE_SLOTS 8

typedef struct {
    PyObject_HEAD
    uint32_t *keys;          /* SURPRISE_SLOTS a bucket */
    float *values;           /* SURPRISE_SLOTS a bucket */
    unsigned char *spilled;  /* a bucket's keys did not all fit */
    uint64_t *spill;         /* key << 32 | the float's bits, ascending */
    Py_ssize_t spill_count, count;
    float fallback;          /* the surprise of a key not in the table */
    int shift;               /* a key's bucket: (key * golden ratio) >> shift */
} SurpriseTableObject;

static inline uint64_t surprise_bucket(const SurpriseTableObject *t, uint64_t key) {
    return (key * 0x9E3779B97F4A7C15ULL) >> t->shift;
}

static float spilled_surprise(const SurpriseTableObject *t, uint32_t key) {
    Py_ssize_t low = 0, high = t->spill_count;
    while (low < high) {
        Py_ssize_t middle = low + (high - low) / 2;
        uint32_t found = (uint32_t)(t->spill[middle] >> 32);
        if (found == key) {
            uint32_t bits = (uint32_t)t->spill[middle];
            float value;
            memcpy(&value, &bits, 4);
            return value;
        }
        if (found < key) low = middle + 1; else high = middle;
    }
    return t->fallback;
}

static inline float surprise_of(const SurpriseTableObject *t, int64_t key) {
    uint64_t bucket = surprise_bucket(t, (uint64_t)key);
    const uint32_t *slots = t->keys + bucket * SURPRISE_SLOTS;
    unsigned found;
#if defined(__SSE2__)
    __m128i wanted = _mm_set1_epi32((int)(uint32_t)key);
    found = (unsigned)_mm_movemask_ps(_mm_castsi128_ps(
                _mm_cmpeq_epi32(_mm_loadu_si128((const __m128i *)slots), wanted))) |
            (unsigned)_mm_movemask_ps(_mm_castsi128_ps(
                _mm_cmpeq_epi32(_mm_loadu_si128((const __m128i *)(slots + 4)), wanted))) << 4;
#else
    found = 0;
    for (int s = 0; s < SURPRISE_SLOTS; s++) found |= (unsigned)(slots[s] == (uint32_t)key) << s;
#endif
    int outside = (uint64_t)key >> 32 != 0;  /* (never in the table; its low bits may match a key that is) */
    if (outside) found = 0;
    unsigned slot = (unsigned)__builtin_ctz(found | 1u << SURPRISE_SLOTS);
    /* (& not &&: one rarely taken branch, not one on found or not) */
    if (__builtin_expect(t->spilled[bucket] & (slot == SURPRISE_SLOTS) & !outside, 0))
        return spilled_surprise(t, (uint32_t)key);
    /* The slot's value, or the fallback when none matched (slot 8), chosen by a mask (not `?:`). */
    uint32_t value, fallback, missed = 0u - (slot >> 3);
    memcpy(&value, &t->values[bucket * SURPRISE_SLOTS + (slot & (SURPRISE_SLOTS - 1))], 4);
    memcpy(&fallback, &t->fallback, 4);
    value = (value & ~missed) | (fallback & missed);
    float chosen;
    memcpy(&chosen, &value, 4);
    return chosen;
}

static int compare_spilled(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static int surprise_table_init(SurpriseTableObject *t, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"keys", "values", "fallback", NULL};
    Py_buffer keys = {0}, values = {0};
    float fallback;
    if (t->keys) {
        PyErr_SetString(PyExc_TypeError, "a SurpriseTable is filled once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*y*f", names, &keys, &values, &fallback)) return -1;
    int result = -1;
    unsigned char *filled = NULL;
    Py_ssize_t count = keys.len / 8;
    if (keys.len % 8 || values.len != count * 4) {
        PyErr_SetString(PyExc_ValueError, "keys: int64, values: float32, one value a key");
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        int64_t key = load_i64(keys.buf, i);
        if (key < 0 || key > 0xFFFFFFFFLL) {
            PyErr_Format(PyExc_ValueError, "key %lld is not a 32-bit key", (long long)key);
            goto done;
        }
    }
    int bits = 1;  /* (a shift below 64) */
    while (((Py_ssize_t)4 << bits) < count) bits++;
    Py_ssize_t buckets = (Py_ssize_t)1 << bits, slots = buckets * SURPRISE_SLOTS;
    t->keys = PyMem_Calloc(slots, sizeof(uint32_t));
    t->values = PyMem_Malloc(slots * sizeof(float));
    t->spilled = PyMem_Calloc(buckets, 1);
    t->spill = PyMem_Malloc((count ? count : 1) * sizeof(uint64_t));
    filled = PyMem_Calloc(buckets, 1);
    if (!t->keys || !t->values || !t->spilled || !t->spill || !filled) {
        PyMem_Free(t->keys), PyMem_Free(t->values), PyMem_Free(t->spilled), PyMem_Free(t->spill);
        t->keys = NULL, t->values = NULL, t->spilled = NULL, t->spill = NULL;
        PyErr_NoMemory();
        goto done;
    }
    t->count = count, t->fallback = fallback, t->shift = 64 - bits;
    for (Py_ssize_t s = 0; s < slots; s++) t->values[s] = fallback;
    for (Py_ssize_t i = 0; i < count; i++) {
        uint64_t key = (uint64_t)load_i64(keys.buf, i), bucket = surprise_bucket(t, key);
        float value = load_f32(values.buf, i);
        if (filled[bucket] == SURPRISE_SLOTS) {
            uint32_t bits_of_value;
            memcpy(&bits_of_value, &value, 4);
            t->spill[t->spill_count++] = key << 32 | bits_of_value;
            t->spilled[bucket] = 1;
            continue;
        }
        Py_ssize_t at = (Py_ssize_t)bucket * SURPRISE_SLOTS + filled[bucket]++;
        t->keys[at] = (uint32_t)key;
        t->values[at] = value;
    }
    qsort(t->spill, t->spill_count, sizeof(uint64_t), compare_spilled);
    uint64_t *kept = PyMem_Realloc(t->spill, (t->spill_count ? t->spill_count : 1) * sizeof(uint64_t));
    if (kept) t->spill = kept;  /* (else the larger block stays, as good) */
    result = 0;
done:
    PyMem_Free(filled);
    PyBuffer_Release(&keys);
    PyBuffer_Release(&values);
    return result;
}

/* Each key's surprise into surprise_out, each row's sum into sums_out (zeroed): the index of the
 * first key whose row is not in [0, size), or -1. Touches no Python object: runs without the GIL.
 * One running sum while the row stays the same (a CSR batch's rows run in order); a row met again
 * later goes on from what it held, so every row adds in the keys' order, as the graph. */
static Py_ssize_t surprise_sums(const SurpriseTableObject *t, const void *keys, const void *weights, const void *rows,
                                Py_ssize_t nnz, Py_ssize_t size, float *surprise_out, float *sums_out) {
    memset(sums_out, 0, size * 4);
    int64_t row = -1;
    float sum = 0.0f;
    for (Py_ssize_t i = 0; i < nnz; i++) {
        int64_t at = load_i64(rows, i);
        if (at < 0 || at >= size) return i;
        float value = surprise_of(t, load_i64(keys, i));
        surprise_out[i] = value;
        if (at != row) {
            if (row >= 0) sums_out[row] = sum;
            row = at, sum = sums_out[at];
        }
        float product = value * load_f32(weights, i);
        sum += product;
    }
    if (row >= 0) sums_out[row] = sum;
    return -1;
}

/* sum_rows(keys, weights, rows, size) -> (surprise [nnz], sums [size]): float32 bytearrays. */
static PyObject *surprise_table_sum_rows(SurpriseTableObject *t, PyObject *args) {
    Py_buffer keys = {0}, weights = {0}, rows = {0};
    Py_ssize_t size;
    if (!t->keys) {
        PyErr_SetString(PyExc_TypeError, "SurpriseTable was not filled");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y*y*y*n", &keys, &weights, &rows, &size)) return NULL;
    PyObject *surprise = NULL, *sums = NULL, *result = NULL;
    Py_ssize_t nnz = keys.len / 8;
    if (keys.len % 8 || weights.len != nnz * 4 || rows.len != nnz * 8 || size < 0 || size > PY_SSIZE_T_MAX / 4) {
        PyErr_SetString(PyExc_ValueError, "keys and rows: int64, weights: float32, one each a key; 0 <= size < 2^61");
        goto done;
    }
    surprise = new_bytearray(nnz * 4);
    sums = new_bytearray(size * 4);
    if (!surprise || !sums) goto done;
    float *surprise_out = (float *)PyByteArray_AS_STRING(surprise), *sums_out = (float *)PyByteArray_AS_STRING(sums);
    Py_ssize_t outside;
    Py_BEGIN_ALLOW_THREADS  /* (the buffers are held, the bytearrays not yet shared, the table read-only) */
    outside = surprise_sums(t, keys.buf, weights.buf, rows.buf, nnz, size, surprise_out, sums_out);
    Py_END_ALLOW_THREADS
    if (outside >= 0) {
        PyErr_Format(PyExc_ValueError, "rows: %lld is not a record of a batch of %zd",
                     (long long)load_i64(rows.buf, outside), size);
        goto done;
    }
    result = PyTuple_Pack(2, surprise, sums);
done:
    Py_XDECREF(surprise);
    Py_XDECREF(sums);
    PyBuffer_Release(&keys);
    PyBuffer_Release(&weights);
    PyBuffer_Release(&rows);
    return result;
}

static PyObject *surprise_table_lookup(SurpriseTableObject *t, PyObject *args) {
    Py_buffer keys = {0};
    if (!t->keys) {
        PyErr_SetString(PyExc_TypeError, "SurpriseTable was not filled");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y*", &keys)) return NULL;
    PyObject *out = NULL;
    if (keys.len % 8) {
        PyErr_SetString(PyExc_ValueError, "keys: int64");
    } else if ((out = new_bytearray(keys.len / 2))) {
        float *values = (float *)PyByteArray_AS_STRING(out);
        for (Py_ssize_t i = 0; i < keys.len / 8; i++) values[i] = surprise_of(t, load_i64(keys.buf, i));
    }
    PyBuffer_Release(&keys);
    return out;
}

static PyObject *surprise_table_nbytes(SurpriseTableObject *t, void *closure) {
    Py_ssize_t buckets = t->keys ? (Py_ssize_t)1 << (64 - t->shift) : 0;
    return PyLong_FromSsize_t(sizeof(*t) + buckets * (SURPRISE_SLOTS * (sizeof(uint32_t) + sizeof(float)) + 1) +
                              t->spill_count * sizeof(uint64_t));
}

static PyObject *surprise_table_spilled(SurpriseTableObject *t, void *closure) {
    return PyLong_FromSsize_t(t->spill_count);
}

static Py_ssize_t surprise_table_len(SurpriseTableObject *t) { return t->count; }

static void surprise_table_dealloc(SurpriseTableObject *t) {
    PyMem_Free(t->keys);
    PyMem_Free(t->values);
    PyMem_Free(t->spilled);
    PyMem_Free(t->spill);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyMethodDef surprise_table_methods[] = {
    {"sum_rows", (PyCFunction)surprise_table_sum_rows, METH_VARARGS,
     "sum_rows(keys, weights, rows, size) -> (surprise, sums): float32 bytearrays"},
    {"lookup", (PyCFunction)surprise_table_lookup, METH_VARARGS, "lookup(keys) -> surprise: a float32 bytearray"},
    {NULL}};

static PyGetSetDef surprise_table_getset[] = {
    {"nbytes", (getter)surprise_table_nbytes, NULL, "bytes held", NULL},
    {"spilled", (getter)surprise_table_spilled, NULL, "keys held in the spill list (their buckets were full)", NULL},
    {NULL}};

static PySequenceMethods surprise_table_as_sequence = {.sq_length = (lenfunc)surprise_table_len};

static PyTypeObject SurpriseTableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "logscore.features._native.SurpriseTable",
    .tp_basicsize = sizeof(SurpriseTableObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "SurpriseTable(keys, values, fallback): a graph's rarity table and its per-record sums.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)surprise_table_init,
    .tp_dealloc = (destructor)surprise_table_dealloc,
    .tp_methods = surprise_table_methods,
    .tp_getset = surprise_table_getset,
    .tp_as_sequence = &surprise_table_as_sequence,
};

/* ------------------------------------------------------------------ module */

static PyObject *comparisons(PyObject *module, PyObject *unused) {
    return PyLong_FromUnsignedLongLong(text_comparisons);
}

/* ------------------------------------------------------------------ forward mode: msgpack's ext hook */

/* ExtHook(ext_type, other)(code, data): Fluentd's EventTime (code 0, bytes) as ext_type, built as
 * tuple.__new__(ext_type, (code, data)) builds it (no argument checks); any other ext value is
 * other(code, data). The compiled twin of forward.ext_value (tests/test_forward_native.py).
 * NOTE: msgpack calls the hook once an entry; the Python one cost about 0.2 µs of the 4 an entry
 * takes forward mode. */
typedef struct {
    PyObject_HEAD
    PyTypeObject *ext_type;
    PyObject *other;
} ExtHookObject;

static PyObject *ext_hook_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    PyObject *ext_type, *other;
    static char *names[] = {"ext_type", "other", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:ExtHook", names, &ext_type, &other)) return NULL;
    if (!PyType_Check(ext_type) || !PyType_IsSubtype((PyTypeObject *)ext_type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "ExtHook's ext_type must be a subclass of tuple (msgpack.ExtType)");
        return NULL;
    }
    if (!PyCallable_Check(other)) {
        PyErr_SetString(PyExc_TypeError, "ExtHook's other must be callable (code, data) for ext values "
                        "that are not EventTimes");
        return NULL;
    }
    ExtHookObject *self = (ExtHookObject *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->ext_type = (PyTypeObject *)Py_NewRef(ext_type);
    self->other = Py_NewRef(other);
    return (PyObject *)self;
}

static PyObject *ext_hook_call(ExtHookObject *self, PyObject *args, PyObject *kwargs) {
    if (kwargs == NULL && PyTuple_GET_SIZE(args) == 2) {
        PyObject *code = PyTuple_GET_ITEM(args, 0), *data = PyTuple_GET_ITEM(args, 1);
        if (PyLong_CheckExact(code) && PyBytes_CheckExact(data)) {
            int overflow = 0;
            long value = PyLong_AsLongAndOverflow(code, &overflow);
            if (value == 0 && !overflow && !PyErr_Occurred()) {
                PyObject *time = self->ext_type->tp_alloc(self->ext_type, 2);
                if (!time) return NULL;
                PyTuple_SET_ITEM(time, 0, Py_NewRef(code));
                PyTuple_SET_ITEM(time, 1, Py_NewRef(data));
                return time;
            }
        }
    }
    return PyObject_Call(self->other, args, kwargs);
}

static int ext_hook_traverse(ExtHookObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->ext_type);
    Py_VISIT(self->other);
    return 0;
}

static int ext_hook_clear(ExtHookObject *self) {
    Py_CLEAR(self->ext_type);
    Py_CLEAR(self->other);
    return 0;
}

static void ext_hook_dealloc(ExtHookObject *self) {
    PyObject_GC_UnTrack(self);
    ext_hook_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject ExtHookType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "logscore.features._native.ExtHook",
    .tp_basicsize = sizeof(ExtHookObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "ExtHook(ext_type, other): msgpack's ext_hook, EventTimes built as ext_type, the rest by other.",
    .tp_new = ext_hook_new,
    .tp_call = (ternaryfunc)ext_hook_call,
    .tp_traverse = (traverseproc)ext_hook_traverse,
    .tp_clear = (inquiry)ext_hook_clear,
    .tp_dealloc = (destructor)ext_hook_dealloc,
};

static PyMethodDef module_methods[] = {
    {"text_features", text_features, METH_VARARGS, "text_features(values, texts, seed, weight, weigher, converter_ref)"},
    {"ngram_encode", ngram_encode, METH_VARARGS, "ngram_encode(values, decode, lowercase, shape, max_bytes)"},
    {"ngram_features", ngram_features, METH_VARARGS,
     "ngram_features(values, encoded, seed, low, high, weight, weigher, converter_ref)"},
    {"url_structures", url_structures, METH_VARARGS, "url_structures(values, full, decode_rounds, enumerated, enumerated_templates)"},
    {"template_set", template_set, METH_O, "template_set(templates): the table url_structures takes"},
    {"url_features", url_features, METH_VARARGS, "url_features(values, structures, full, seed, weight, weigher, converter_ref)"},
    {"comparisons", comparisons, METH_NOARGS, "comparisons(): texts compared while counting features, since load"},
    {"numeric_labels", numeric_labels, METH_VARARGS, "numeric_labels(values, missing_label)"},
    {"distinct", distinct, METH_O, "distinct(column) -> (ids, values)"},
    {"access_columns", access_columns, METH_VARARGS,
     "access_columns(records, wanted, fast, limit, max_line, normalize_one, to_text[, cut])"},
    {"assemble", assemble, METH_VARARGS, "assemble(held, entries, size, with_origins)"},
    {"key_counts", key_counts, METH_VARARGS, "key_counts(column, code, prefix, cache, max_cache, name[, max_chars[, max_bytes]])"},
    {"line_head", line_head, METH_VARARGS, "line_head(line, time_within, level_within) -> (time_start, time_end, "
     "level_start, level_end)"},
    {NULL}};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "_native", "The compiled featurizer (see sidecar/logscore/features/native.py).", -1,
    module_methods};

PyMODINIT_FUNC PyInit__native(void) {
    crc_init();
    shape_init();
    space_init();
    if (PyType_Ready(&FeaturesType) < 0 || PyType_Ready(&CacheType) < 0 || PyType_Ready(&SurpriseTableType) < 0 ||
        PyType_Ready(&ExtHookType) < 0)
        return NULL;
    PyObject *numpy = PyImport_ImportModule("numpy");
    if (!numpy) return NULL;
    numpy_frombuffer = PyObject_GetAttrString(numpy, "frombuffer");
    PyObject *int64 = PyObject_GetAttrString(numpy, "int64"), *float32 = PyObject_GetAttrString(numpy, "float32");
    Py_DECREF(numpy);
    if (!numpy_frombuffer || !int64 || !float32) return NULL;
    dtype_int64 = int64;
    dtype_float32 = float32;
    PyObject *module = PyModule_Create(&native_module);
    if (!module) return NULL;
    if (PyModule_AddObjectRef(module, "Features", (PyObject *)&FeaturesType) < 0 ||
        PyModule_AddObjectRef(module, "Cache", (PyObject *)&CacheType) < 0 ||
        PyModule_AddObjectRef(module, "SurpriseTable", (PyObject *)&SurpriseTableType) < 0 ||
        PyModule_AddObjectRef(module, "ExtHook", (PyObject *)&ExtHookType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
