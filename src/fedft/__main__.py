from fedft.cli import main

raise SystemExit(main())
