"""No token, assertion, private key or cache key in DEBUG logs or exception text, across
every Agent Gateway flow (success, 401 retry, failures, back-off, bad credentials)."""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from _tls import (
    TEST_CACHE_KEY,
    USER_JWT,
    cache_config,
    make_tls,
    mtls_credentials,
    transparent_credentials,
)

from agw_persist_cache import PersistentTokenCache, TokenFetchError
from agw_persist_cache.agentgateway import (
    AgentGatewayAuth,
    AgentGatewayTokens,
    CredentialsError,
    CustomerCredentials,
    IasTokenClient,
)
from tests.support.tokenserver import TokenServer

LOGGERS = ("", "httpx", "httpcore", "agw_persist_cache", "hpack")


def exception_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc)


async def test_no_secret_in_debug_logs_or_exceptions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    tls = make_tls()
    ca = tls.write_ca(tmp_path)
    errors: list[BaseException] = []

    def expect_failure(exc_type: type[BaseException], call: Callable[[], object]) -> None:
        with pytest.raises(exc_type) as info:
            call()
        errors.append(info.value)

    with TokenServer(ssl_context=tls.server_context(require_client_cert=True)) as srv:
        creds = mtls_credentials(tls, srv.token_url)
        ias = IasTokenClient(creds, ca_file=ca)
        cache = PersistentTokenCache(tmp_path / "tokens.db", config=cache_config())
        tokens = AgentGatewayTokens(cache, ias)
        verify = tls.client_context(with_cert=True)
        # successes, sync and async, system and user, with a 401 retry each
        for user in (None, USER_JWT):
            auth = AgentGatewayAuth(tokens, user_token=user)
            with httpx.Client(verify=verify, auth=auth) as client:
                assert client.get(srv.resource_url).status_code == 200
                srv.revoke_all()
                assert client.get(srv.resource_url).status_code == 200
            async with httpx.AsyncClient(verify=verify, auth=auth) as aclient:
                srv.revoke_all()
                assert (await aclient.get(srv.resource_url)).status_code == 200
        srv.resource_status = 401
        with httpx.Client(verify=verify, auth=AgentGatewayAuth(tokens)) as client:
            assert client.get(srv.resource_url).status_code == 401
        srv.resource_status = None
        # failures: error bodies echoing the assertion, no access_token, outage + back-off
        echo = {"error": "invalid_grant", "error_description": f"rejected {USER_JWT}"}
        srv.override = (400, json.dumps(echo))
        expect_failure(TokenFetchError, lambda: ias.exchange_user_token(USER_JWT))
        srv.override = (200, json.dumps({"token_type": "bearer", "note": USER_JWT}))
        expect_failure(TokenFetchError, lambda: ias.exchange_user_token(USER_JWT))
        with pytest.raises(TokenFetchError) as async_info:
            await tokens.auser_token(USER_JWT + "y")  # async path: no access_token either
        errors.append(async_info.value)
        srv.override = None
        srv.status = 500
        other_user = USER_JWT + "x"
        expect_failure(TokenFetchError, lambda: tokens.user_token(other_user))
        expect_failure(TokenFetchError, lambda: tokens.user_token(other_user))  # back-off
        srv.status = 200
        # transport failure: no client certificate against the mTLS endpoint
        plain = IasTokenClient(transparent_credentials(srv.token_url), ca_file=ca)
        expect_failure(TokenFetchError, lambda: plain.exchange_user_token(USER_JWT))
        plain.close()
        await ias.aclose()
        await cache.aclose()
        issued = list(srv.issued_tokens)
    # credentials that are wrong in secret-bearing fields
    expect_failure(
        CredentialsError,
        lambda: CustomerCredentials(
            "https://i", "c", "g", certificate=tls.client_key_pem, private_key=tls.client_key_pem
        ),
    )
    binding = tmp_path / "b" / "agw"
    binding.mkdir(parents=True)
    (binding / "type").write_text("integration-credentials")
    (binding / "credentials").write_text('{"privateKey": ' + json.dumps(tls.client_key_pem) + ",")
    expect_failure(CredentialsError, lambda: CustomerCredentials.from_binding(tmp_path / "b"))

    assert len(issued) >= 6 and len(errors) == 8
    assert any("retrying once" in r.getMessage() for r in caplog.records)
    assert any(r.name.startswith("httpcore") for r in caplog.records)
    haystack = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    haystack += "\n".join(exception_text(e) for e in errors)
    key_lines = [ln for ln in tls.client_key_pem.splitlines() if ln and "-----" not in ln]
    secrets = {"user JWT": USER_JWT, "cache key": TEST_CACHE_KEY}
    secrets.update({f"issued token {i}": token for i, token in enumerate(issued)})
    secrets.update({f"private key line {i}": line for i, line in enumerate(key_lines)})
    secrets["user JWT payload"] = USER_JWT.split(".")[1]
    leaked = [name for name, value in secrets.items() if value in haystack]
    assert leaked == []
