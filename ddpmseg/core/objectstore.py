"""Object stores (``s3://``, ``gs://``, ``az://``, ``memory://``...) reached through fsspec.

A store path that is a URL (``core.fileio.is_url``) is read and written through zarr's fsspec
store; this module holds what ddpmseg itself does with such a location:

- ``check_access``: reach it before anything is written or read (credentials, endpoint,
  bucket), so that a missing credential is one line naming the fix, never a botocore
  traceback;
- ``access_problem``: the same line for an exception raised later, mid-run (the CLI's last
  resort, ``cli.main``);
- compare-and-swap on one small object (``read_tagged``, ``create_object``,
  ``replace_object``), which the object-store writer lock (``core.locking``) is made of.

Credentials and endpoints come the ecosystem's way: for S3, botocore's ``AWS_*`` environment
variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``...) and
``AWS_ENDPOINT_URL`` for an S3-compatible server (MinIO, moto, Ceph...). No fsspec import
happens unless a URL is used.
"""

from __future__ import annotations

import errno
import logging
from urllib.parse import urlsplit

from ddpmseg.core.errors import StoreAccessError

log = logging.getLogger(__name__)

# Schemes whose first path component is a bucket (container) that must exist.
BUCKETED = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
# The package that gives fsspec each scheme, and the extra that installs it.
DRIVERS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", None),
           "gcs": ("gcsfs", None), "az": ("adlfs", None), "abfs": ("adlfs", None),
           "abfss": ("adlfs", None)}
# Library loggers that would otherwise print a line per request at INFO.
CHATTY_LOGGERS = ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "gcsfs", "adlfs")

CREDENTIALS_HINT = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for "
                    "S3, and AWS_ENDPOINT_URL for an S3-compatible server")
ENDPOINT_HINT = ("check AWS_ENDPOINT_URL (the S3-compatible server's address) and that the "
                 "server is running")


def scheme(url: str) -> str:
    return urlsplit(str(url)).scheme.lower()


def bucket(url: str) -> str:
    """The bucket (container) of a URL, '' for a scheme without buckets (memory://)."""
    parts = urlsplit(str(url))
    return parts.netloc if parts.scheme.lower() in BUCKETED else ""


def filesystem(url: str):
    """(fsspec filesystem, path inside it) of a URL. A scheme whose driver is not installed
    is a StoreAccessError naming the package to install."""
    try:
        from fsspec.core import url_to_fs

        return url_to_fs(str(url))
    except ImportError as exc:
        package, extra = DRIVERS.get(scheme(url), ("fsspec", None))
        how = f"pip install 'ddpmseg[{extra}]'" if extra else f"pip install {package}"
        raise StoreAccessError(f"{url}: {scheme(url)}:// needs the package {package}, which "
                               "is not installed", how) from exc
    except ValueError as exc:  # an unknown protocol
        raise StoreAccessError(f"{url}: unknown URL scheme {scheme(url)}://",
                               "use s3://, gs://, az:// or memory://, or a local path") from exc


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _client_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def access_problem(exc: BaseException, url: str = "") -> StoreAccessError | None:
    """The StoreAccessError an object store's exception stands for (no credentials, endpoint
    unreachable, access denied, no such bucket), or None for any other exception. Classified
    by name: botocore is never imported here."""
    where = f" for {url}" if url else ""
    for e in _chain(exc):
        name, code = type(e).__name__, _client_code(e)
        if name in ("NoCredentialsError", "PartialCredentialsError",
                    "CredentialRetrievalError", "NoAuthTokenError"):
            return StoreAccessError(f"no object-store credentials{where} ({e})",
                                    CREDENTIALS_HINT)
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
                    "ClientConnectorError", "ServerDisconnectedError"):
            return StoreAccessError(f"cannot reach the object store{where} ({e})",
                                    ENDPOINT_HINT)
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                    "ExpiredToken", "InvalidToken", "403"):
            return StoreAccessError(f"the object store refused the credentials{where} "
                                    f"({code})", "check " + CREDENTIALS_HINT)
        if code == "NoSuchBucket" or "bucket does not exist" in str(e).lower():
            name = bucket(url) if url else "the bucket"
            return StoreAccessError(f"bucket {name} does not exist{where}",
                                    "create it (e.g. `aws s3 mb s3://BUCKET`) or check the URL")
    return None


def check_access(url: str) -> None:
    """Reach ``url``'s object store now (its bucket, with the credentials and endpoint of the
    environment), before anything is read or written: a problem is one StoreAccessError
    naming the fix."""
    fs, _ = filesystem(url)
    name = bucket(url)
    if not name:
        return
    try:
        fs.info(name)
    except FileNotFoundError as exc:
        raise StoreAccessError(f"bucket {name} does not exist (store {url})",
                               "create it (e.g. `aws s3 mb s3://BUCKET`) or check the URL"
                               ) from exc
    except Exception as exc:  # noqa: BLE001 - the driver's own errors, classified
        problem = access_problem(exc, url)
        if problem is None:
            raise
        raise problem from exc


def exists(url: str) -> bool:
    """Whether an object, or any object under the prefix, is at ``url``."""
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    return bool(fs.exists(path))


def quiet_drivers() -> None:
    """Keep the object-store libraries' per-request INFO lines (``Found credentials in
    environment variables.``) out of a command's log."""
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


# -- compare-and-swap on one small object (the writer lock) ---------------------------------

def read_tagged(fs, path: str) -> tuple[bytes, str] | None:
    """(content, tag) of an object, None when there is none. The tag is the object's ETag
    where the store gives one (read before the content: a replace conditioned on it fails if
    the object changed since), else its content."""
    fs.invalidate_cache(path)
    try:
        tag = fs.info(path).get("ETag")
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    return bytes(data), (str(tag) if tag else data.decode("latin-1"))


def create_object(fs, path: str, data: bytes) -> bool:
    """Write ``data`` to ``path`` only if no object is there (S3: ``If-None-Match: *``);
    False when one is."""
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    except TypeError as exc:  # an fsspec driver from before its "exclusive write"
        raise StoreAccessError(f"{type(fs).__name__} {path}: this version cannot create an "
                               f"object only if absent ({exc})",
                               "upgrade it: pip install -U 'ddpmseg[s3]'") from exc
    fs.invalidate_cache(path)
    return True


def replace_object(fs, path: str, data: bytes, tag: str) -> bool:
    """Overwrite ``path`` with ``data`` only if it still has ``tag`` (``read_tagged``); False
    when it changed meanwhile. S3: a conditional put (``If-Match``), atomic on the server;
    other stores: compared, then written (not atomic: one process at a time there)."""
    if scheme_of(fs) in ("s3", "s3a"):
        try:
            fs.pipe_file(path, data, IfMatch=tag)
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            raise
        fs.invalidate_cache(path)
        return True
    now = read_tagged(fs, path)
    if now is None or now[1] != tag:
        return False
    fs.pipe_file(path, data)
    return True


def delete_object(fs, path: str, tag: str) -> bool:
    """Delete ``path`` if it still has ``tag``; False when it changed or is gone."""
    now = read_tagged(fs, path)
    if now is None or now[1] != tag:
        return False
    fs.rm_file(path)
    fs.invalidate_cache(path)
    return True


def scheme_of(fs) -> str:
    protocol = fs.protocol
    return (protocol if isinstance(protocol, str) else protocol[0]).lower()


def _precondition_failed(exc: BaseException) -> bool:
    return any(_client_code(e) == "PreconditionFailed" or "pre-condition" in str(e).lower()
               or getattr(e, "errno", None) == errno.EINVAL and "condition" in str(e).lower()
               for e in _chain(exc))
