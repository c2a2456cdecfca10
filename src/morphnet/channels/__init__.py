"""Stage 2: channel groups from the captured graph (op-handler table + generic walker)."""

from morphnet.channels.analysis import ChannelAnalysis, analyze_channels, analyze_model

__all__ = ["ChannelAnalysis", "analyze_channels", "analyze_model"]
