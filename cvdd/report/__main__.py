"""``python -m cvdd.report <folder>``: tables and a plot of every result below a folder."""

from cvdd.report import main

main()
