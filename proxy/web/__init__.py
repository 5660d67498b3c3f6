"""The aiohttp shell: forward each call, tap its reply, price it, log one record; ``/health``.

Modules, each importing only those before it: ``state`` (``ProxyState``, ``APP_STATE``),
``calls`` (``Call``: one call's bookkeeping and record), ``access`` (proxy keys,
attribution, budgets), ``headers``, ``upload`` (request bodies in and out), ``relay``
(streamed replies), ``forward`` (``handle_proxy``), ``health`` (``handle_health``),
``app`` (``create_app``). Only this package imports aiohttp.
"""
