import numpy as np
import torch

from rnnscale.data.packing import PackedRows, collate
from rnnscale.data.synthetic import BOS, EOS, MarkovDocuments


def test_documents_are_deterministic_and_well_formed():
    a, b = MarkovDocuments(100, 20, seed=3), MarkovDocuments(100, 20, seed=3)
    for i in (0, 5, 1000):
        np.testing.assert_array_equal(a[i], b[i])
        assert a[i][0] == BOS and a[i][-1] == EOS and len(a[i]) >= 3
        assert ((a[i][1:-1] >= 3) & (a[i][1:-1] < 100)).all()
    assert not np.array_equal(a[0], MarkovDocuments(100, 20, seed=4)[0])


def test_rows_cover_the_stream_without_gaps():
    docs = MarkovDocuments(50, 10, seed=0)
    rows = PackedRows(docs, seq_len=16)
    got = np.concatenate([rows.next_row()[0] for _ in range(20)])
    want = np.concatenate([docs[i] for i in range(200)])[: len(got)]
    np.testing.assert_array_equal(got, want)


def test_document_starts_and_cu_seqlens():
    docs = [np.arange(n) + 10 * n for n in (3, 5, 9, 2, 30)]
    rows = PackedRows(docs, seq_len=8)
    r1, s1 = rows.next_row()  # docs 0 (3) + 1 (5) + first token of doc 2
    r2, s2 = rows.next_row()  # rest of doc 2 (8 tokens) + doc 3's first token (label only)
    assert s1 == [0, 3] and s2 == [0]
    np.testing.assert_array_equal(r1, np.concatenate([docs[0], docs[1], docs[2][:1]]))
    batch = collate([(r1, s1), (r2, s2)], pack_documents=True)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["cu_seqlens"].tolist() == [0, 3, 8, 16]
    assert batch["cu_seqlens"].dtype == torch.int32
    torch.testing.assert_close(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    assert collate([(r1, s1)], pack_documents=False)["cu_seqlens"] is None


def test_state_dict_resumes_exactly():
    docs = MarkovDocuments(50, 10, seed=0)
    a = PackedRows(docs, 16)
    for _ in range(7):
        a.next_row()
    b = PackedRows(docs, 16)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        ra, sa = a.next_row()
        rb, sb = b.next_row()
        np.testing.assert_array_equal(ra, rb)
        assert sa == sb
