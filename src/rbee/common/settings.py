"""Setting types every daemon shares, written once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Self

from pydantic import AfterValidator, AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, CliSuppress, PydanticBaseSettingsSource

Seconds = Annotated[float, Field(gt=0)]
MiB = 1024 * 1024


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:7833")
    return value.rstrip("/")


HttpUrl = Annotated[str, AfterValidator(_http_url)]


class DaemonSettings(BaseSettings):
    """What every daemon takes the same way: its credential, TLS, the hosts it answers to and
    its request size limit. Each daemon's settings class adds its own prefix and options."""

    # The cluster token comes from the environment (`RBEE_TOKEN`) or a file, never from argv,
    # where `ps` shows it to every user of the machine. Hidden from --help; a `--token` flag
    # is refused by `parse_settings`.
    token: CliSuppress[str | None] = Field(
        None, validation_alias=AliasChoices("token", "RBEE_TOKEN"), repr=False
    )
    token_file: Path | None = Field(
        None, description="read the cluster token from this file (instead of env RBEE_TOKEN)"
    )
    tls_cert: Path | None = Field(None, description="serve HTTPS with this certificate (PEM)")
    tls_key: Path | None = Field(None, description="the private key of --tls-cert (PEM)")
    allowed_host: list[str] = Field(
        default_factory=list,
        description="a Host name this daemon answers to besides loopback ones (repeatable; "
        "only checked without a token)",
    )
    max_body_bytes: int = Field(8 * MiB, ge=1024, description="largest request body accepted")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags (passed in by CliApp) and the environment: the daemons name no .env file or
        # secrets directory, and asking those sources for nothing was a third of the ~3 ms a
        # worker's flags take to parse, which a swap waits for.
        return (init_settings, env_settings)

    @model_validator(mode="after")
    def _credentials(self) -> Self:
        if self.token_file is not None:
            if self.token:
                raise ValueError("give the cluster token once: RBEE_TOKEN or --token-file")
            try:
                self.token = self.token_file.expanduser().read_text().strip() or None
            except OSError as exc:
                raise ValueError(f"--token-file {self.token_file}: {exc.strerror}") from None
            if self.token is None:
                raise ValueError(f"--token-file {self.token_file} is empty")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        for path in (self.tls_cert, self.tls_key):
            if path is not None and not path.expanduser().is_file():
                raise ValueError(f"{path} is not a readable file")
        return self

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    @property
    def tls(self) -> tuple[Path, Path] | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        return self.tls_cert.expanduser(), self.tls_key.expanduser()
