"""Agent Gateway tokens without the SDK: customer credentials, an IAS client over httpx
(mTLS or transparent), a cached token source and an ``httpx.Auth`` with one 401 retry.

    creds = CustomerCredentials.detect()
    tokens = AgentGatewayTokens(PersistentTokenCache(), IasTokenClient(creds))
    async with httpx.AsyncClient(auth=AgentGatewayAuth(tokens)) as client: ...
"""

from ._auth import AgentGatewayAuth
from ._credentials import CredentialsError, CustomerCredentials, IntegrationDependency
from ._ias import AGW_RESOURCE_URN, IasTokenClient
from ._tokens import AgentGatewayTokens

__all__ = [
    "AGW_RESOURCE_URN",
    "AgentGatewayAuth",
    "AgentGatewayTokens",
    "CredentialsError",
    "CustomerCredentials",
    "IasTokenClient",
    "IntegrationDependency",
]
