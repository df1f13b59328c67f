from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "sparse", "nnz")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    NNZ_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    sparse: bool
    nnz: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., sparse: bool = ..., nnz: _Optional[int] = ...) -> None: ...

class Header(_message.Message):
    __slots__ = ("version", "sender", "recipient", "sequence", "round", "kind", "tensors", "body_bytes", "in_reply_to", "scalars", "sender_certificate", "digest_algorithm")
    class ScalarsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    BODY_BYTES_FIELD_NUMBER: _ClassVar[int]
    IN_REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    SCALARS_FIELD_NUMBER: _ClassVar[int]
    SENDER_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    version: int
    sender: str
    recipient: str
    sequence: int
    round: int
    kind: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    body_bytes: int
    in_reply_to: int
    scalars: _containers.ScalarMap[str, float]
    sender_certificate: bytes
    digest_algorithm: str
    def __init__(self, version: _Optional[int] = ..., sender: _Optional[str] = ..., recipient: _Optional[str] = ..., sequence: _Optional[int] = ..., round: _Optional[int] = ..., kind: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., body_bytes: _Optional[int] = ..., in_reply_to: _Optional[int] = ..., scalars: _Optional[_Mapping[str, float]] = ..., sender_certificate: _Optional[bytes] = ..., digest_algorithm: _Optional[str] = ...) -> None: ...

class LedgerHead(_message.Message):
    __slots__ = ("index", "entry_hash", "signature")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ENTRY_HASH_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    index: int
    entry_hash: bytes
    signature: bytes
    def __init__(self, index: _Optional[int] = ..., entry_hash: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Trailer(_message.Message):
    __slots__ = ("model_digest", "ledger_head", "signature")
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    LEDGER_HEAD_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    model_digest: bytes
    ledger_head: LedgerHead
    signature: bytes
    def __init__(self, model_digest: _Optional[bytes] = ..., ledger_head: _Optional[_Union[LedgerHead, _Mapping]] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("header", "data", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: Header
    data: bytes
    trailer: Trailer
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., data: _Optional[bytes] = ..., trailer: _Optional[_Union[Trailer, _Mapping]] = ...) -> None: ...
