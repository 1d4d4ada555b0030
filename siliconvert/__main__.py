from siliconvert.cli import main

main()
