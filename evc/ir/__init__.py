"""The IR: an FX GraphModule and the transformer structure recognised in it (evc.ir.program.Program),
with what it costs (macs, latency) and shows (summary)."""
