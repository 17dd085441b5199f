#!/usr/bin/env bash
# Draws the hit-path chart (requests/s and p99 latency per proxy) as SVG from the table
# bench/hit_path.sh writes with HIT_PATH_TSV, with gnuplot (installed from Debian's
# packages when missing):
#
#   HIT_PATH_TSV=/tmp/hit_path.tsv bench/hit_path.sh 10
#   bench/chart.sh /tmp/hit_path.tsv docs/hit_path.svg "run of 2026-11-30, 2 cores"
set -euo pipefail
IN="$1"; OUT="$2"; TITLE="${3:-hit path}"
command -v gnuplot >/dev/null || { SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"; DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq gnuplot-nox; }
gnuplot <<GNUPLOT
set terminal svg size 1000,440 font "sans,12" background rgb "white" noenhanced
set output "$OUT"
set datafile separator "\t"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set boxwidth 0.8 relative
set grid ytics
set xtics rotate by -25 scale 0
set key off
set multiplot layout 1,2 title "$TITLE"
set bmargin 7
set title "requests/s (higher is better)"
set yrange [0:*]
plot "$IN" using 2:xtic(1) linecolor rgb "#2a6f97"
set title "p99 latency, ms (lower is better)"
plot "$IN" using 4:xtic(1) linecolor rgb "#c44536"
unset multiplot
GNUPLOT
echo "wrote $OUT"
