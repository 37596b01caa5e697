"""``twistd eth-client`` / ``eth client``: options, and the service they describe.

The options are the fields of the client's settings classes (their defaults and
help are written there); :meth:`Options.postOptions` builds one checked
:class:`~eth_twisted.client.service.ClientSettings` and ``makeService`` hands
it down. Nothing below this module sees the options.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from twisted.logger import Logger
from twisted.python import usage

from eth_twisted.client.endpoints import RPCSettings
from eth_twisted.client.finality import FinalitySettings
from eth_twisted.client.outbox import OutboxSettings
from eth_twisted.client.poller import PollSettings
from eth_twisted.client.push import PushSettings
from eth_twisted.client.sender import DeliverySettings
from eth_twisted.client.service import ClientSettings, LinkSettings
from eth_twisted.errors import ConfigError
from eth_twisted.interfaces import maybe_global_reactor
from eth_twisted.options import (
    PRECEDENCE,
    EnvOptions,
    env_name,
    flag_rows,
    option_rows,
    settings_from,
    state_path,
)
from eth_twisted.web.app import SITE_OPTIONS, exposure_warning, site_settings_from

log = Logger()


def _help(cls: type, name: str) -> str:
    """The help text of the option field ``name`` of the settings class ``cls``."""
    return str(next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name))


class Options(EnvOptions):
    """Options of the eth-client (same for ``twistd eth-client`` and ``eth client``)."""

    synopsis = "[options]"
    longdesc = (
        "Watch the Ethereum chain head over JSON-RPC and deliver every new block, in "
        "order and acknowledged, to an eth-server. Blocks wait in a durable outbox "
        "(--spool) until the server answers OK or DUP. " + PRECEDENCE
    )
    repeatable = ("rpc",)
    secrets = ("stats-token",)
    doc_rpc = _help(RPCSettings, "rpc")
    optFlags = [
        *flag_rows(ClientSettings),
        ["verbose", "v", "Log at debug level (every poll, every frame)"],
        *flag_rows(LinkSettings),
    ]
    optParameters: list[list[Any]] = [
        *option_rows(LinkSettings),
        *option_rows(PollSettings),
        *option_rows(OutboxSettings),
        *option_rows(DeliverySettings),
        *option_rows(PushSettings),
        *option_rows(FinalitySettings),
        *option_rows(RPCSettings, "rpc_timeout"),
        [
            "secret-file",
            None,
            None,
            "File holding the link's shared secret (also ETH_SECRET, $CREDENTIALS_DIRECTORY/link-secret)",
        ],
        [
            "stats",
            None,
            ClientSettings().site.stats,
            "Endpoint of /healthz, /readyz and /metrics, or 'none'",
        ],
        *SITE_OPTIONS,
    ]

    settings: ClientSettings
    """What ``makeService`` builds the client from (set by :meth:`postOptions`)."""

    def postOptions(self) -> None:
        """Resolve the derived values, build and check :attr:`settings` once, and collect the warnings."""
        if self["tls"] and self.from_argv("connect"):
            raise usage.UsageError("--tls connects to --host/--port; leave out --connect")
        if not self["rpc"]:
            self["rpc"] = list(RPCSettings().rpc)
        if not self["spool"] or not (self.from_argv("spool") or env_name("spool") in self.environ):
            self["spool"] = state_path(OutboxSettings().spool, self.environ)
        if self["stats"] is not None and self["stats"].strip().lower() == "none":
            self["stats"] = None
        try:
            self.settings = self.client_settings()
        except (ConfigError, ValueError) as e:
            raise usage.UsageError(str(e))
        self["connect"] = self.settings.link.server
        self._warn_rpc_credentials()
        site = self.settings.site
        exposed = exposure_warning(site.stats, site.stats_allowed_hosts, site.stats_token)
        if exposed:
            self.warnings.append(exposed)

    def client_settings(self) -> ClientSettings:
        """The settings of everything ``eth client`` runs, checked.

        A ConfigError or ValueError names the option at fault.
        """
        from eth_twisted.link.secret import load_secret

        link = settings_from(
            LinkSettings, self, secret=load_secret(file=self["secret-file"], environ=self.environ)
        )
        settings = settings_from(
            ClientSettings,
            self,
            link=link,
            rpc=settings_from(RPCSettings, self, rpc=tuple(self["rpc"])),
            poll=settings_from(PollSettings, self),
            outbox=settings_from(OutboxSettings, self),
            delivery=settings_from(DeliverySettings, self),
            push=settings_from(PushSettings, self),
            finality=settings_from(FinalitySettings, self),
            site=site_settings_from(self, self["stats"]),
        )
        settings.check()
        return settings

    def _warn_rpc_credentials(self) -> None:
        from eth_twisted.client.endpoints import RPCEndpoint

        if not self.from_argv("rpc"):
            return
        for url in self.settings.rpc.rpc:
            target = RPCEndpoint.from_url(url).target
            if target.authorization is not None:
                self.warnings.append(
                    f"--rpc {target.label} carries a password on the command line, visible to every "
                    "local user (ps, /proc); pass the URL in ETH_RPC instead"
                )


def makeService(config: Options, reactor: Any = None) -> Any:
    """Build the eth-client from parsed options.

    twistd calls this without a reactor: the global one is used and a fatal
    error ends the process with status 2 (see :mod:`eth_twisted.client.service`).
    The ``eth`` CLI passes its reactor and reads ``exit_code`` instead.
    """
    from eth_twisted.client.service import make_client_service

    exit_on_fatal = reactor is None
    reactor = maybe_global_reactor(reactor)
    for warning in config.warnings:
        log.warn("{warning}", warning=warning)
    return make_client_service(config.settings, reactor=reactor, exit_on_fatal=exit_on_fatal)
