"""What users run beside `evc build`: explain, diff, report, bench, and the README's key tables."""
