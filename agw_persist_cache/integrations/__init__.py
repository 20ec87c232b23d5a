"""Adapters for third-party SDKs; each lives in its own module and imports its SDK only there.

``agw_persist_cache.integrations.sap`` is the drop-in for ``sap-cloud-sdk`` (extra ``[sap]``).
"""
